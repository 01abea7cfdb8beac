"""Entry point: ``python -m cairn.train [--module M --config C] [--job.config_file f.toml] [--section.field v]``.

Usually launched through ``run_train.sh`` (torchrun). User errors print one clear message
and exit with status 2; nothing already saved is touched.
"""

from __future__ import annotations

import logging
import sys

from cairn.config.job_config import as_flags
from cairn.config.manager import ConfigError, parse_args


def main(argv: list[str] | None = None) -> int:
    try:
        job_config = parse_args(argv)
    except ConfigError as e:
        print(f"cairn.train: {e}", file=sys.stderr)
        return 2
    from cairn.checkpoint import CheckpointError
    from cairn.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(job_config)
        trainer.train()
    except (ConfigError, CheckpointError) as e:
        message = as_flags(str(e))  # the checkpoint library names Config fields; a user here typed flags
        logging.getLogger("cairn").error("%s", message)
        print(f"cairn.train: {message}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
