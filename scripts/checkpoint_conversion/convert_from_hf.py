"""Convert a Hugging Face model directory to a cairn DCP checkpoint (HF -> cairn).

    python scripts/checkpoint_conversion/convert_from_hf.py <input_dir> <output_dir> \
        --model_name llama3 --model_flavor 8B

``--model_flavor`` may be left out when <input_dir> has a config.json (the size is read
from it). The output is a model-only DCP checkpoint: start training from it with
``--checkpoint.initial_load_path <output_dir>``. Nothing is written to <output_dir> unless
the whole conversion succeeds; <output_dir> must not exist or be empty.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a checkout run without `pip install -e .`

from cairn.checkpoint.errors import CheckpointError  # noqa: E402
from cairn.checkpoint.store import local_folder, local_output  # noqa: E402
from cairn.checkpoint.convert import convert_hf_to_dcp  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input_dir", help="Hugging Face directory (safetensors, config.json)")
    parser.add_argument("output_dir", help="where the DCP checkpoint goes (absent or empty)")
    parser.add_argument("--model_name", default="llama3", help="model family (default: llama3)")
    parser.add_argument("--model_flavor", default=None,
                        help="model size, e.g. 8B; default: inferred from <input_dir>/config.json")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="store tensors in this dtype (default: the input's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        # either folder may be s3://bucket/prefix: read from a verified download, written through an upload
        with local_folder(args.input_dir, "input_dir") as source, local_output(args.output_dir) as target:
            stats = convert_hf_to_dcp(source, target, model_name=args.model_name, flavor=args.model_flavor,
                                      dtype=args.dtype, progress=not args.quiet)
    except (ValueError, CheckpointError) as e:  # every user error: the message names the file, key or flag
        print(f"convert_from_hf: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_dir}: {stats['tensors']} tensors, {stats['bytes'] / 1e9:.2f} GB "
          f"in {stats['seconds']:.1f} s (flavor: {stats['flavor'] or 'from config.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
