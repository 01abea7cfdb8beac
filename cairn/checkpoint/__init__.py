"""cairn's checkpointing, for any PyTorch training loop.

Two ways in (docs/checkpoint.md, "Use it from your own loop"):

- ``CheckpointManager``: the policy (interval, retention, async mode, resume precedence, HF
  export), built from a ``CheckpointManager.Config`` and your model and ``Stateful`` states;
- plain functions: ``save``, ``load``, ``list_steps``, ``latest_step``, ``verify``, with a
  ``BackgroundSaver`` for async saves into reused (pinned) host buffers, and
  ``CairnAsyncStager`` for ``torch.distributed.checkpoint.async_save``.

Checkpoints live in a store (``open_store``): a local or shared folder, or ``s3://bucket/prefix``.
Whatever the way in, a step becomes visible only once it is complete on every rank, every file
carries an xxh3 checksum in the step's manifest, and loading never runs code from a file.

Layers, lowest first (each imports only from those below it; tests/unit/test_layering.py
enforces it): errors -> layout, faults, adapter, state, results -> fsio, lease -> manifest,
torchzip, planner -> dcp_metadata, commit, writer_process -> writer, reader -> local, s3 -> store
-> staging, hf, retention, mirror -> api, memory -> manager -> readers -> convert -> cli.
"""

import importlib

# name -> the module that defines it; imported on first use, so that importing one module of the
# package (the CLI's parser, a model's adapter) does not import all of them (and torch).
_EXPORTS = {
    "BackgroundSaver": "cairn.checkpoint.api",
    "CairnAsyncStager": "cairn.checkpoint.staging",
    "CheckpointConfig": "cairn.checkpoint.manager",
    "CheckpointConfigError": "cairn.checkpoint.errors",
    "CheckpointError": "cairn.checkpoint.errors",
    "CheckpointManager": "cairn.checkpoint.manager",
    "CheckpointStore": "cairn.checkpoint.store",
    "CorruptCheckpointError": "cairn.checkpoint.errors",
    "FolderBusyError": "cairn.checkpoint.lease",
    "HFCheckpointError": "cairn.checkpoint.errors",
    "LoadResult": "cairn.checkpoint.results",
    "ModelState": "cairn.checkpoint.state",
    "OptimizerState": "cairn.checkpoint.state",
    "PerRankState": "cairn.checkpoint.state",
    "RNGState": "cairn.checkpoint.state",
    "SaveError": "cairn.checkpoint.errors",
    "SaveHandle": "cairn.checkpoint.api",
    "SaveResult": "cairn.checkpoint.results",
    "StateDictAdapter": "cairn.checkpoint.adapter",
    "TransformersAdapter": "cairn.checkpoint.adapter",
    "UnsafeCheckpointError": "cairn.checkpoint.errors",
    "WriterDiedError": "cairn.checkpoint.errors",
    "latest_step": "cairn.checkpoint.api",
    "list_steps": "cairn.checkpoint.api",
    "load": "cairn.checkpoint.api",
    "load_full_state_dict": "cairn.checkpoint.reader",
    "load_hf": "cairn.checkpoint.hf",
    "open_store": "cairn.checkpoint.store",
    "save": "cairn.checkpoint.api",
    "save_hf": "cairn.checkpoint.hf",
    "state_bytes": "cairn.checkpoint.state",
    "verify": "cairn.checkpoint.api",
}

__all__ = [
    "BackgroundSaver",
    "CairnAsyncStager",
    "CheckpointConfig",
    "CheckpointConfigError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointStore",
    "CorruptCheckpointError",
    "FolderBusyError",
    "HFCheckpointError",
    "LoadResult",
    "ModelState",
    "OptimizerState",
    "PerRankState",
    "RNGState",
    "SaveError",
    "SaveHandle",
    "SaveResult",
    "StateDictAdapter",
    "TransformersAdapter",
    "UnsafeCheckpointError",
    "WriterDiedError",
    "latest_step",
    "list_steps",
    "load",
    "load_full_state_dict",
    "load_hf",
    "open_store",
    "save",
    "save_hf",
    "state_bytes",
    "verify",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cairn.checkpoint' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
