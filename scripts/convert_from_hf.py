"""Shorter path for scripts/checkpoint_conversion/convert_from_hf.py (torchtitan's docs use both)."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).resolve().parent / "checkpoint_conversion" / "convert_from_hf.py"),
               run_name="__main__")
