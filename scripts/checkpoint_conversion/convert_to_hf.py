"""Convert a cairn DCP checkpoint to a Hugging Face model directory (cairn -> HF).

    python scripts/checkpoint_conversion/convert_to_hf.py <input_dir> <output_dir> \
        --hf_assets_path ./assets/hf/Llama3.1-8B --model_name llama3 --model_flavor 8B \
        [--export_dtype bfloat16]

<input_dir> is a step folder (full or model-only, saved by any parallel layout). Tokenizer
files, generation_config.json and bos/eos ids come from --hf_assets_path; the model size
from --model_flavor, else from --hf_assets_path's config.json. The output loads with
``AutoModelForCausalLM.from_pretrained(<output_dir>)``. Nothing is written to <output_dir>
unless the whole conversion succeeds; <output_dir> must not exist or be empty.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a checkout run without `pip install -e .`

from cairn.checkpoint.errors import CheckpointError  # noqa: E402
from cairn.checkpoint.store import local_folder, local_output, optional_local_folder  # noqa: E402
from cairn.checkpoint.convert import convert_dcp_to_hf  # noqa: E402
from cairn.checkpoint.hf import DEFAULT_MAX_SHARD_BYTES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input_dir", help="cairn DCP checkpoint (a step-N folder)")
    parser.add_argument("output_dir", help="where the Hugging Face directory goes (absent or empty)")
    parser.add_argument("--hf_assets_path", default=None,
                        help="folder with tokenizer files (and config.json) to ship with the weights")
    parser.add_argument("--model_name", default="llama3", help="model family (default: llama3)")
    parser.add_argument("--model_flavor", default=None,
                        help="model size, e.g. 8B; default: inferred from --hf_assets_path's config.json")
    parser.add_argument("--export_dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the safetensors (default: float32)")
    parser.add_argument("--max_shard_bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES,
                        help="largest safetensors file (default: 5 GB)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        # any of the three folders may be s3://bucket/prefix
        with local_folder(args.input_dir, "input_dir") as source, \
                optional_local_folder(args.hf_assets_path, "--hf_assets_path") as assets, \
                local_output(args.output_dir) as target:
            stats = convert_dcp_to_hf(source, target, model_name=args.model_name, flavor=args.model_flavor,
                                      hf_assets_path=assets, export_dtype=args.export_dtype,
                                      max_shard_bytes=args.max_shard_bytes, progress=not args.quiet)
    except (ValueError, CheckpointError) as e:  # every user error: the message names the file, key or flag
        print(f"convert_to_hf: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_dir}: {stats['tensors']} tensors in {len(stats['files'])} file(s), "
          f"{stats['bytes'] / 1e9:.2f} GB in {stats['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
