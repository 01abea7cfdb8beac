"""Where relative data paths resolve: the working directory first, then the repo root.

So ``--model.tokenizer_path assets/tokenizer/tokenizer.json`` and ``--dataloader.dataset
bundled`` work from any working directory of a source checkout.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path: str | Path) -> Path | None:
    """The existing file or folder ``path`` names (absolute), or None if there is none."""
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate.resolve()
    if not candidate.is_absolute() and (REPO_ROOT / candidate).exists():
        return (REPO_ROOT / candidate).resolve()
    return None


def not_found_message(flag: str, path: str | Path) -> str:
    """``--flag 'path': no such file or folder (looked in ...)``."""
    if Path(path).expanduser().is_absolute():
        return f"{flag} {str(path)!r}: no such file or folder"
    return f"{flag} {str(path)!r}: no such file or folder (looked in {Path.cwd()} and {REPO_ROOT})"
