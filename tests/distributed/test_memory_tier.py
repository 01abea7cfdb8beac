"""The memory tier on real gloo ranks: 4 ranks as 2 nodes of 2 (LOCAL_WORLD_SIZE 2), each node
its own folder. Each ``run_distributed`` call is a fresh set of processes: a restart.

Snapshots and their replicas are committed; a node whose folder is wiped restores from the
replicas its neighbours keep; a damaged byte is found by its chunk's checksum, named, and every
rank falls back to the older snapshot together; a snapshot killed before its commit leaves the
previous one in use; a disk step newer than every snapshot wins.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from _launch import run_distributed

pytestmark = pytest.mark.slow

NODES, PER_NODE = 2, 2
WORLD = NODES * PER_NODE


def node_dir(base: str, rank: int) -> Path:
    return Path(base) / f"node{rank // PER_NODE}"


def state_at(rank: int, step: int) -> dict:
    """What rank ``rank`` holds after step ``step``: tensors of several dtypes and plain values."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return {"layers.0.weight": torch.randn(300, 70, generator=g),  # 84 000 bytes: several small chunks
            "layers.0.bias": torch.randn(70, generator=g).to(torch.bfloat16),
            "optimizer": {"state": {"layers.0.weight": {"step": torch.tensor(float(step)),
                                                        "exp_avg": torch.randn(300, 70, generator=g)}},
                          "param_groups": [{"lr": 0.01 * step, "betas": (0.9, 0.95), "params": ["layers.0.weight"]}]},
            "train_state": {"step": step, "tokens_seen": 128 * step},
            "rng": {f"rank_{rank}": {"torch": torch.randint(0, 255, (16,), dtype=torch.uint8, generator=g)}}}


def template(rank: int) -> dict:
    """The live state a restarted rank restores into: same shapes, other values."""
    out = state_at(rank, 0)
    for key in ("layers.0.weight", "layers.0.bias"):
        out[key].zero_()
    return out


def tier(base: str, rank: int, world: int, *, replicas: int = 1):
    import torch.distributed as dist

    from cairn.checkpoint import memory, memory_slots

    os.environ["LOCAL_WORLD_SIZE"] = str(PER_NODE)
    memory_slots.CHUNK, memory.TRANSFER_PIECE = 16 << 10, 24 << 10  # many chunks and pieces on a small state
    group = dist.new_group(backend="gloo") if world > 1 else None
    run = {**memory_slots.run_identity(str(Path(base) / "checkpoint"), {"name": "test"}, None), "id": "run-1"}
    return memory.MemoryTier(node_dir(base, rank), rank=rank, world_size=world, layout={"dp_shard": world},
                             run=run, replicas=replicas, group=group)


class Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def take(rank: int, world: int, base: str, steps: list[int], fault: str | None = None, skip: int = 0) -> list[int]:
    if fault is not None:
        os.environ.update(CAIRN_FAULT=f"{fault}:exit", CAIRN_FAULT_SKIP=str(skip))
    t = tier(base, rank, world)
    for step in steps:
        t.snapshot(step, state_at(rank, step))
        t.wait_for_staging()
        t.record_progress(step + 1)
    t.close(remove=False)
    return t.taken


def resume(rank: int, world: int, base: str, disk_step: int | None) -> dict:
    import torch.distributed as dist

    from cairn.checkpoint.memory import restore

    messages = Messages()
    logging.getLogger("cairn").addHandler(messages)
    t = tier(base, rank, world)
    restored: dict = {}
    result = restore(t, disk_step, lambda: template(rank), restored.update, group=dist.new_group(backend="gloo"))
    t.close(remove=False)
    if result is None:
        return {"result": None, "messages": messages.lines}
    expected = state_at(rank, result["from_step"])
    same = all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(leaves(restored), leaves(expected)))
    plain_same = restored["train_state"] == expected["train_state"] and \
        restored["optimizer"]["param_groups"] == expected["optimizer"]["param_groups"]
    return {"result": result, "bitwise": same and plain_same, "messages": messages.lines}


def leaves(state: dict) -> list[torch.Tensor]:
    from cairn.checkpoint.state import tensor_leaves

    return [tensor for _, tensor in tensor_leaves(state)]


def test_snapshots_replicas_node_loss_and_a_damaged_byte(tmp_path):
    base = str(tmp_path)
    assert run_distributed(take, WORLD, base, [2, 4, 6]) == [[2, 4, 6]] * WORLD
    for node in range(NODES):  # two slots of each own rank, two replica slots of each rank of the other node
        folder = tmp_path / f"node{node}"
        ranks = range(node * PER_NODE, (node + 1) * PER_NODE)
        others = [(r + PER_NODE) % WORLD for r in ranks]
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [f"rank-{r}" for r in ranks] + [f"replica-of-{r}" for r in others] + [f"progress-{r}" for r in ranks]
            + ["run.json"])
        for r in others:
            assert len(list((folder / f"replica-of-{r}").glob("slot-*/COMMITTED"))) == 2

    # all processes gone, the hosts kept their memory: every rank restores its own newest snapshot
    out = run_distributed(resume, WORLD, base, None)
    assert all(o["result"]["from_step"] == 6 and o["result"]["tier"] == "memory" and o["bitwise"] for o in out)
    assert out[0]["result"]["steps_lost"] == 1  # progress said step 7 was trained

    # node 1 is lost and replaced: an empty folder; its ranks get their snapshots from node 0
    shutil.rmtree(tmp_path / "node1")
    out = run_distributed(resume, WORLD, base, None)
    for o in out:
        assert o["bitwise"], o
        assert o["result"]["from_step"] == 6 and o["result"]["tier"] == "replica"
        assert o["result"]["ranks_from_replicas"] == 2

    # a byte flipped in the newest replica rank 0 keeps for rank 2: found, named, the older one used
    slots = sorted((tmp_path / "node0" / "replica-of-2").glob("slot-*"),
                   key=lambda s: (s / "COMMITTED").read_text())
    newest = max(slots, key=lambda s: __import__("json").loads((s / "COMMITTED").read_text())["step"])
    data = newest / "data.bin"
    with open(data, "r+b") as f:
        f.seek(40_000)
        byte = f.read(1)
        f.seek(40_000)
        f.write(bytes([byte[0] ^ 0x10]))
    out = run_distributed(resume, WORLD, base, None)
    assert all(o["result"]["from_step"] == 4 and o["bitwise"] for o in out), out
    named = [line for o in out for line in o["messages"] if str(data) in line and "checksum mismatch" in line]
    assert named, [o["messages"] for o in out]

    # a disk step newer than every snapshot: the memory tier steps aside
    out = run_distributed(resume, WORLD, base, 8)
    assert all(o["result"] is None for o in out)


def test_a_snapshot_killed_before_its_commit_leaves_the_previous_one(tmp_path):
    base = str(tmp_path)
    # every rank dies (exit 99) in its third snapshot, after the copy, before the commit
    with pytest.raises(Exception):
        run_distributed(take, WORLD, base, [2, 4, 6], "during_snapshot", 2)
    out = run_distributed(resume, WORLD, base, None)
    assert all(o["result"]["from_step"] == 4 and o["bitwise"] for o in out), out


def test_a_replica_killed_mid_transfer_is_never_used(tmp_path):
    base = str(tmp_path)
    # every rank dies in its third replica transfer: step 6 is committed on each rank's own node,
    # its replicas are torn (uncommitted)
    with pytest.raises(Exception):
        run_distributed(take, WORLD, base, [2, 4, 6], "during_replica", 2)
    out = run_distributed(resume, WORLD, base, None)
    assert all(o["result"]["from_step"] == 6 and o["result"]["tier"] == "memory" and o["bitwise"] for o in out)
    shutil.rmtree(tmp_path / "node1")  # now node 1's step 6 exists nowhere whole: step 4, from the replicas
    out = run_distributed(resume, WORLD, base, None)
    assert all(o["result"]["from_step"] == 4 and o["result"]["tier"] == "replica" and o["bitwise"] for o in out)


def test_one_process_without_replicas(tmp_path):
    """One node, one rank: replicas asked for are refused with a warning, snapshots still work."""
    assert run_distributed(take, 1, str(tmp_path), [3, 5]) == [[3, 5]]
    out = run_distributed(resume, 1, str(tmp_path), 5)
    assert out[0]["result"]["from_step"] == 5 and out[0]["bitwise"]  # as new as the disk's: memory is faster
