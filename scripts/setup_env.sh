#!/usr/bin/env bash
# Prints the path of a Python that can run cairn, setting one up on first use.
#   scripts/setup_env.sh        runtime dependencies
#   scripts/setup_env.sh dev    + test dependencies
# Order of preference:
#   1. $CAIRN_PYTHON, if set.
#   2. ./.venv, once set up (a stamp file records what was installed).
#   3. A python3 that already imports torch (a GPU host with a CUDA build): reused through a
#      venv with --system-site-packages, so its torch is never replaced; if that host has no
#      network, wheels in ./.whl are used.
#   4. Otherwise a fresh ./.venv with the CPU build: `pip install torch==2.13.0`.
# All messages go to stderr; stdout is only the python path.
set -euo pipefail
extra="${1:-}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${CAIRN_PYTHON:-}" ]]; then echo "$CAIRN_PYTHON"; exit 0; fi

venv="$root/.venv"
hash="$(cat "$root/pyproject.toml" "$root/scripts/setup_env.sh" | sha1sum | cut -c1-12)"
need="$hash${extra:+-$extra}"
stamp="$venv/.cairn-setup"
if [[ -x "$venv/bin/python" && -f "$stamp" ]]; then
  if grep -qx -- "$need" "$stamp" || { [[ -z "$extra" ]] && grep -qx -- "$hash-dev" "$stamp"; }; then
    echo "$venv/bin/python"; exit 0
  fi
fi

log() { echo "[setup] $*" >&2; }
base_python="$(command -v python3 || command -v python)"
system_torch="$("$base_python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"

if [[ ! -x "$venv/bin/python" ]]; then
  if [[ -n "$system_torch" ]]; then
    log "reusing the installed torch $system_torch (venv with system site packages)"
    "$base_python" -m venv --system-site-packages "$venv" >&2
  else
    log "creating $venv"
    "$base_python" -m venv "$venv" >&2
  fi
fi
py="$venv/bin/python"
pip_opts=(-q --disable-pip-version-check)
if [[ -d "$root/.whl" ]]; then pip_opts+=(--find-links "$root/.whl"); fi
torch_version="$("$py" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [[ -z "$torch_version" ]]; then
  log "installing torch==2.13.0 (CPU build)"
  "$py" -m pip install "${pip_opts[@]}" torch==2.13.0 >&2
  torch_version=2.13.0
fi
# Pin the torch that is there, so no dependency can pull another (several GB of CUDA) build.
constraints="$(mktemp)"; trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"
target="."; [[ -n "$extra" ]] && target=".[$extra]"
log "installing cairn ${target} (editable)"
(cd "$root" && "$py" -m pip install "${pip_opts[@]}" -c "$constraints" -e "$target" >&2)
echo "$need" >> "$stamp"
echo "$py"
