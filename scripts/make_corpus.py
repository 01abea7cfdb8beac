"""Build cairn's bundled training corpus from the running CPython's own documentation.

    python scripts/make_corpus.py            # writes assets/corpus/corpus.jsonl.gz
    python scripts/make_corpus.py --check    # exit 1 if the committed corpus differs

Offline and deterministic: the text comes from two parts of the interpreter's standard
library, both under the PSF License Version 2 (see assets/corpus/ORIGIN.md):

- ``pydoc_data.topics``: the help topics of the Python Language Reference that ``help()``
  shows (one document per topic);
- the docstrings of the pure-Python standard library modules, read with ``ast`` (no module
  is imported, so no side effects), one document per module file.

The same interpreter version gives byte-identical text; other versions give a slightly
different corpus (``--check`` says so). The gzip stream is written with a zero timestamp
so that the file itself is reproducible too.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import io
import json
import shutil
import sys
import sysconfig
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "assets" / "corpus" / "corpus.jsonl.gz"

# Folders of the stdlib that are tests, generated tables, vendored or third-party code.
SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                "encodings", "turtledemo", "lib2to3", "ensurepip", "distutils"}
# Modules whose code carries a licence notice besides the PSF's (listed in the Python
# docs' "Licenses and Acknowledgements"): left out so that the corpus is PSF-only.
EXTRA_NOTICE_MODULES = {"asynchat.py", "asyncore.py", "http/cookies.py", "trace.py", "uu.py",
                        "xmlrpc/__init__.py", "xmlrpc/client.py", "xmlrpc/server.py"}
MIN_DOCSTRING_WORDS = 5
MIN_DOCUMENT_WORDS = 20


def help_topic_documents() -> list[dict[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split pydoc_data into another package
        print("warning: pydoc_data is missing; the corpus will lack the help topics", file=sys.stderr)
        return []
    return [{"text": topics[name].strip() + "\n", "source": f"pydoc_data.topics:{name}"}
            for name in sorted(topics)]


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    return f"{node.name}({ast.unparse(node.args)})"


def _member_docstrings(node: ast.AST, prefix: str) -> list[str]:
    """Public classes/functions (and their public methods) as "heading\\ndocstring" blocks."""
    blocks = []
    for child in getattr(node, "body", []):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if child.name.startswith("_") and child.name != "__init__":
            continue
        if isinstance(child, ast.ClassDef):
            heading = f"class {prefix}{child.name}"
        else:
            heading = prefix + _signature(child)
        docstring = ast.get_docstring(child)
        if docstring and len(docstring.split()) >= MIN_DOCSTRING_WORDS:
            blocks.append(f"{heading}\n{docstring.strip()}")
        if isinstance(child, ast.ClassDef):
            blocks.extend(_member_docstrings(child, f"{prefix}{child.name}."))
    return blocks


def _module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_included(relative: Path) -> bool:
    if any(part in SKIPPED_DIRS or part.startswith("config-") for part in relative.parts[:-1]):
        return False
    name = relative.name
    return not (name.startswith(("_sysconfigdata", "test_")) or relative.as_posix() in EXTRA_NOTICE_MODULES)


def module_documents(stdlib: Path) -> list[dict[str, str]]:
    documents = []
    for path in sorted(stdlib.rglob("*.py"), key=lambda p: p.relative_to(stdlib).as_posix()):
        relative = path.relative_to(stdlib)
        if not _is_included(relative):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        blocks = [f"Module {_module_name(relative)}"]
        module_docstring = ast.get_docstring(tree)
        if module_docstring:
            blocks.append(module_docstring.strip())
        blocks.extend(_member_docstrings(tree, ""))
        text = "\n\n".join(blocks) + "\n"
        if len(text.split()) >= MIN_DOCUMENT_WORDS:
            documents.append({"text": text, "source": f"stdlib:{relative.as_posix()}"})
    return documents


def build_jsonl() -> bytes:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = help_topic_documents() + module_documents(stdlib)
    lines = (json.dumps(doc, ensure_ascii=False, sort_keys=True) for doc in documents)
    return ("\n".join(lines) + "\n").encode("utf-8")


def write_gzip(data: bytes, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    # mtime=0 and no file name: the same text always gives the same bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(output)


def copy_license(output_dir: Path) -> None:
    license_file = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if license_file.is_file():
        shutil.copyfile(license_file, output_dir / "LICENSE-PSF.txt")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--check", action="store_true",
                        help="compare with the existing corpus instead of writing it")
    args = parser.parse_args()

    data = build_jsonl()
    digest = hashlib.sha256(data).hexdigest()
    num_documents = data.count(b"\n")
    python = sys.version.split()[0]
    if args.check:
        if not args.output.is_file():
            print(f"{args.output} does not exist", file=sys.stderr)
            return 1
        existing = gzip.decompress(args.output.read_bytes())
        if existing != data:
            print(f"{args.output} differs from what CPython {python} produces "
                  f"(sha256 {hashlib.sha256(existing).hexdigest()} vs {digest})", file=sys.stderr)
            return 1
        print(f"{args.output} matches (sha256 {digest})")
        return 0
    write_gzip(data, args.output)
    copy_license(args.output.parent)
    print(f"wrote {args.output}: {num_documents} documents, {len(data):,} bytes of text "
          f"({args.output.stat().st_size:,} compressed), CPython {python}, sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
