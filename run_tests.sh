#!/usr/bin/env bash
# Run the whole test suite. Sets up ./.venv with dev dependencies on first use.
#   ./run_tests.sh                 everything (unit, distributed gloo, end-to-end)
#   ./run_tests.sh -m "not slow"   skip the end-to-end runs
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$("$root/scripts/setup_env.sh" dev)"
cd "$root"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1
exec "$python" -m pytest tests -q -n "${CAIRN_TEST_WORKERS:-2}" --timeout 900 "$@"
