"""Checkpointing: policy (manager), storage (commit, integrity, safe reads), async staging, HF."""
