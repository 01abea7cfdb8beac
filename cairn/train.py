"""Entry point: ``python -m cairn.train [--module M --config C] [--job.config_file f.toml] [--section.field v]``.

Usually launched through ``run_train.sh`` (torchrun). User errors print one clear message
and exit with status 2; nothing already saved is touched.
"""

from __future__ import annotations

import time

_ENTERED = time.time()  # before any import: where the interpreter's start ends (StartupClock)

import logging  # noqa: E402
import sys  # noqa: E402

from cairn.config.manager import ConfigError, parse_args


def main(argv: list[str] | None = None) -> int:
    try:
        job_config = parse_args(argv)
    except ConfigError as e:
        print(f"cairn.train: {e}", file=sys.stderr)
        return 2
    from cairn.checkpoint import CheckpointError
    from cairn.trainer import StartupClock, Trainer

    trainer = None
    try:
        trainer = Trainer(job_config, StartupClock(entered=_ENTERED))
        trainer.train()
    except (ConfigError, CheckpointError) as e:
        logging.getLogger("cairn").error("%s", e)
        print(f"cairn.train: {e}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
