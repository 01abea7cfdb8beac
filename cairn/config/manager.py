"""Builds a JobConfig from its layers: defaults < run config < TOML < CLI flags.

- Run configs are Python functions in ``cairn/models/<module>/config_registry.py``
  picked with ``--module <module> --config <function>`` (env ``MODULE``/``CONFIG`` in
  ``run_train.sh``).
- A TOML file (``--job.config_file f.toml``; ``CONFIG_FILE`` in ``run_train.sh``) with
  ``[section]`` tables whose keys are the fields of that section.
- ``--section.field value`` / ``--section.field=value`` flags, parsed by tyro:
  booleans as ``--checkpoint.enable`` / ``--checkpoint.no-enable``, lists comma-separated.

Errors name what the user typed (flag, file and key) and are collected, then raised once.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package (pyproject.toml installs it there)
    import tomli as tomllib

from cairn.config.job_config import JobConfig, type_matches

# Top-level flags from torchtitan's docs, rewritten to cairn's sections.
FLAG_ALIASES = {"--hf_assets_path": "--model.hf_assets_path"}
_PRE_FLAGS = ("--module", "--config", "--job.config_file")


class ConfigError(ValueError):
    """A user error in the configuration; ``str()`` lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem"
                         f"{'s' if len(self.problems) != 1 else ''}):\n{lines}")


def available_run_configs(module: str) -> dict[str, Callable[[], JobConfig]]:
    """Public functions of ``cairn.models.<module>.config_registry`` that return a JobConfig."""
    try:
        registry = importlib.import_module(f"cairn.models.{module}.config_registry")
    except ModuleNotFoundError as e:
        raise ConfigError([f"--module {module!r}: no such model module (cairn/models/{module}/config_registry.py)"]) from e
    return {name: fn for name, fn in vars(registry).items()
            if isinstance(fn, types.FunctionType) and not name.startswith("_")
            and fn.__module__ == registry.__name__}


def run_config(module: str, name: str) -> JobConfig:
    configs = available_run_configs(module)
    if name not in configs:
        raise ConfigError([f"--config {name!r}: not a run config of --module {module}; "
                           f"choose from {', '.join(sorted(configs))}"])
    config = configs[name]()
    if not isinstance(config, JobConfig):
        raise ConfigError([f"--config {name!r} returned {type(config).__name__}, not a JobConfig"])
    return config


def apply_toml(config: JobConfig, path: str | Path) -> list[str]:
    """Set the fields named in a TOML file on ``config``; returns the problems found."""
    path = Path(path)
    if not path.is_file():
        return [f"--job.config_file {path}: no such file"]
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        return [f"--job.config_file {path}: not valid TOML ({e})"]
    problems = []
    sections = config.sections()
    for section_name, table in data.items():
        if section_name not in sections:
            problems.append(f"{path}: unknown section [{section_name}]; known: {', '.join(sections)}")
            continue
        if not isinstance(table, dict):
            problems.append(f"{path}: [{section_name}] must be a table")
            continue
        section = sections[section_name]
        hints = typing.get_type_hints(type(section))
        for key, value in table.items():
            if key not in hints:
                problems.append(f"{path}: [{section_name}] unknown key {key!r}")
            elif not type_matches(value, hints[key]):
                problems.append(f"{path}: [{section_name}] {key} = {value!r} is not of type {hints[key]}")
            else:
                setattr(section, key, float(value) if hints[key] is float else value)
    return problems


def _pop_flag(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    """Remove ``flag value`` or ``flag=value`` from argv; returns (value, rest)."""
    value, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == flag:
            if i + 1 >= len(argv):
                raise ConfigError([f"{flag} needs a value"])
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return value, rest


def _rewrite_aliases(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        head, sep, tail = arg.partition("=")
        out.append(FLAG_ALIASES.get(head, head) + sep + tail)
    return out


def parse_args(argv: list[str] | None = None, *, prog: str = "cairn.train") -> JobConfig:
    """The JobConfig for a command line. Raises ConfigError; ``--help`` exits 0."""
    import tyro  # imported here: config objects stay usable without the CLI stack

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = _rewrite_aliases(argv)
    module, argv = _pop_flag(argv, "--module")
    config_name, argv = _pop_flag(argv, "--config")
    config_file, argv = _pop_flag(argv, "--job.config_file")

    if config_name is not None:
        config = run_config(module or "llama3", config_name)
    elif module is not None:
        config = run_config(module, f"{module}_debugmodel")
    else:
        config = JobConfig()
    problems: list[str] = []
    config_file = config_file or config.job.config_file
    if config_file:
        problems.extend(apply_toml(config, config_file))
        config.job.config_file = config_file
    if problems:
        raise ConfigError(problems)

    config = tyro.cli(JobConfig, default=config, args=argv, prog=prog, use_underscores=True,
                      description=__doc__.split("\n\n")[0] if __doc__ else None)
    return finalize(config)


def finalize(config: JobConfig) -> JobConfig:
    """Normalize list flags and check every section; raises ConfigError listing all problems."""
    config.checkpoint.normalize()
    problems = config.problems()
    if problems:
        raise ConfigError(problems)
    return config


def to_dict(config: JobConfig) -> dict[str, Any]:
    """A plain, JSON-able dict of the config (recorded in checkpoint manifests)."""
    return dataclasses.asdict(config)
