"""Loading errors name the file and the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from engine.loader import ModelLoadError, load_model
from tests.engine.checkpoints import tiny_checkpoint, write_tiny_gguf


@pytest.fixture
def checkpoint_copy(tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("qwen2"), target)
    return target


def rewrite_weights(directory: Path, edit) -> Path:
    file = directory / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def test_missing_tensor_in_hf_directory(checkpoint_copy):
    file = rewrite_weights(checkpoint_copy, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ModelLoadError) as err:
        load_model(checkpoint_copy)
    assert str(file) in str(err.value)
    assert "missing tensor model.layers.1.mlp.down_proj.weight" in str(err.value)


def test_bad_shape_in_hf_directory(checkpoint_copy):
    def shrink(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][
            :-1
        ]

    file = rewrite_weights(checkpoint_copy, shrink)
    with pytest.raises(ModelLoadError) as err:
        load_model(checkpoint_copy)
    message = str(err.value)
    assert str(file) in message and "model.layers.0.self_attn.k_proj.weight" in message
    assert "bad shape (31, 64), expected (32, 64)" in message


def test_unsupported_architecture_in_hf_directory(checkpoint_copy):
    config_file = checkpoint_copy / "config.json"
    config = json.loads(config_file.read_text())
    config["model_type"] = "gpt2"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"config\.json: unsupported architecture 'gpt2'") as err:
        load_model(checkpoint_copy)
    assert str(config_file) in str(err.value)


def test_unsupported_rope_scaling(checkpoint_copy):
    config_file = checkpoint_copy / "config.json"
    config = json.loads(config_file.read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported rope type 'dynamic'") as err:
        load_model(checkpoint_copy)
    assert str(config_file) in str(err.value)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors"])
def test_missing_file_in_hf_directory(checkpoint_copy, name):
    (checkpoint_copy / name).unlink()
    with pytest.raises(ModelLoadError) as err:
        load_model(checkpoint_copy)
    message = str(err.value)
    if name == "model.safetensors":
        assert str(checkpoint_copy) in message and "no *.safetensors weight files" in message
    else:
        assert f"{checkpoint_copy / name}: missing file" in message


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or directory") as err:
        load_model(tmp_path / "nowhere.gguf")
    assert str(tmp_path / "nowhere.gguf") in str(err.value)


def test_corrupt_safetensors(checkpoint_copy):
    file = checkpoint_copy / "model.safetensors"
    file.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="unreadable safetensors file") as err:
        load_model(checkpoint_copy)
    assert str(file) in str(err.value)


def test_gguf_missing_tensor(tmp_path):
    path = write_tiny_gguf("llama", tmp_path / "m.gguf", drop_tensors=("blk.1.ffn_up.weight",))
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert f"{path}: missing tensor model.layers.1.mlp.up_proj.weight" in str(err.value)


def test_gguf_unsupported_architecture(tmp_path):
    path = write_tiny_gguf("llama", tmp_path / "m.gguf", architecture="falcon")
    with pytest.raises(ModelLoadError, match="unsupported architecture 'falcon'") as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_gguf_truncated_file(tmp_path):
    path = write_tiny_gguf("qwen2", tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert str(path) in str(err.value)
