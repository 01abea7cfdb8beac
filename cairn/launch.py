"""torchrun for ``cairn.train``, ending a run stopped by a user error with cairn's own line.

``run_train.sh`` starts ``python -m cairn.launch <torchrun arguments> -m cairn.train ...``:
torchrun itself, in this process, with the same arguments and signals. A worker that stops on a
user error (a bad flag, a missing or corrupt checkpoint: ``cairn.train`` exits 2) writes its
one line into torchrun's error file for that rank (``TORCHELASTIC_ERROR_FILE``). When the job
then fails, torchrun's report (which rank, exit code, error file) goes into a file beside the
ranks' logs, one line says where, and cairn's line is the last thing printed. Any other failure
(a crash with a traceback, a signal) is reported by torchrun as it always is.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The key under which cairn.train records its one-line message in torchrun's error file.
ERROR_FILE_KEY = "cairn_user_error"


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        data = failure.error_file_data if isinstance(failure.error_file_data, dict) else {}
        message = data.get(ERROR_FILE_KEY)
        if not isinstance(message, str):
            raise  # not one of cairn's user errors: torchrun's own report, as always
        print(f"torchrun: rank {rank} stopped with exit code {failure.exitcode}; {_keep_report(e, failure)}",
              file=sys.stderr)
        print(f"cairn.train: {message}", file=sys.stderr, flush=True)
        return failure.exitcode
    return 0


def _keep_report(error, failure) -> str:
    """Write torchrun's report beside the ranks' logs; says where (or prints it, if it cannot)."""
    attempt = Path(failure.error_file).parent.parent  # <log dir>/<run id>/attempt_<n>/<local rank>/error.json
    report = attempt / "torchrun_failure.txt"
    try:
        report.write_text(error.format_msg() + "\n")
    except OSError:
        return f"torchrun's report:\n{error.format_msg()}"
    return f"torchrun's report: {report} (each rank's output: {attempt}/<local rank>/)"


if __name__ == "__main__":
    sys.exit(main())
