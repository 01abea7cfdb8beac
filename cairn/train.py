"""Entry point: ``python -m cairn.train [--module M --config C] [--job.config_file f.toml] [--section.field v]``.

Usually launched through ``run_train.sh`` (torchrun, by way of ``cairn.launch``). User errors
print one clear message and exit with status 2; nothing already saved is touched. Under
torchrun the message also goes into this rank's error file, where ``cairn.launch`` finds it,
and a crash's traceback goes there too (torchrun's report then shows it).
"""

from __future__ import annotations

import time

_ENTERED = time.time()  # before any import: where the interpreter's start ends (StartupClock)

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from cairn.config.job_config import as_flags
from cairn.config.manager import ConfigError, parse_args
from cairn.launch import ERROR_FILE_KEY


def main(argv: list[str] | None = None) -> int:
    try:
        job_config = parse_args(argv)
    except ConfigError as e:
        return _user_error(str(e))
    from cairn.checkpoint import CheckpointError
    from cairn.trainer import StartupClock, Trainer

    trainer = None
    try:
        trainer = Trainer(job_config, StartupClock(entered=_ENTERED))
        trainer.train()
    except (ConfigError, CheckpointError) as e:
        message = as_flags(str(e))  # the checkpoint library names Config fields; a user here typed flags
        logging.getLogger("cairn").error("%s", message)
        return _user_error(message)
    except Exception as e:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(e)  # the traceback, for torchrun's report
        raise
    finally:
        if trainer is not None:
            trainer.close()
    return 0


def _user_error(message: str) -> int:
    print(f"cairn.train: {message}", file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:  # torchrun's error file format, and the line itself for cairn.launch
        record = {"message": {"message": f"cairn.train: {message}",
                              "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}},
                  ERROR_FILE_KEY: message}
        try:
            with open(error_file, "w") as f:
                json.dump(record, f)
        except OSError:
            pass  # the message is on stderr all the same
    return 2


if __name__ == "__main__":
    sys.exit(main())
