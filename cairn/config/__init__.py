from cairn.config.job_config import JobConfig
from cairn.config.manager import ConfigError, finalize, parse_args

__all__ = ["JobConfig", "ConfigError", "finalize", "parse_args"]
