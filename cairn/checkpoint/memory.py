"""The in-memory tier: every few steps each rank's whole training state in host memory that
outlives the training process (``/dev/shm``), and a replica of it on another node.

    --checkpoint.memory_interval K    snapshot every K steps (0: off)
    --checkpoint.memory_replicas 1    also keep a copy on the next node's host (same local rank)
    --checkpoint.memory_dir DIR       where (default /dev/shm/cairn-<hash of the checkpoint folder>)

The files, per node under ``memory_dir``, are ``memory_slots.py``'s.

A snapshot is staged into the slot that does not hold the newest snapshot, by the same
background staging as ``async_with_pinned_mem`` (a side stream straight into the slot's
``data.bin``, pinned where CUDA can register it), after ``COMMITTED`` of that slot was removed; ``COMMITTED`` is written last
(a rename), so a snapshot is whole or absent. The replica goes to rank ``r + local world size``
over a gloo group of its own, on the snapshot's worker thread, into a double-buffered replica
slot committed the same way. A snapshot still in flight when the next one is due makes that
one skipped (all ranks agree), never waited for.

On restart all ranks agree on the newest step every rank can get (its own slot, or a replica
held by another rank, sent to it over gloo) that is newer than the newest committed disk step,
on the same layout; each rank checks its copy's checksums, and any failure makes every rank
fall back to the next candidate (logged, naming the file), then to disk. Restores are bitwise
what was snapshotted. A run that ends normally (its last step saved) removes its snapshots.

What it costs: host memory of four times the rank's state (two slots of its own, two of the
replica it keeps; two with replicas off), and per snapshot one copy of the state to host
(on GPUs the optimizer step after a snapshot waits for that copy), checksums and the
replica's transfer on a background thread.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import logging
import mmap
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import xxhash

from cairn.checkpoint.faults import fault_point
from cairn.checkpoint.memory_slots import (Mapped, Slot, chunk_hashes, make_slots, own_slots, progress_path,
                                           read_progress, replica_slots, write_progress)
from cairn.checkpoint.staging import HostStager
from cairn.checkpoint.state import local_tensor, tensor_leaves

logger = logging.getLogger("cairn")

LEAF = "__cairn_memory_leaf__"  # what stands for a tensor in state.pt
TRANSFER_PIECE = 32 << 20  # bytes per message of a replica's transfer


def skeleton(obj: Any) -> Any:
    """``obj`` with every tensor replaced by a placeholder: the plain values a snapshot keeps in state.pt."""
    if isinstance(obj, dict):
        return {key: skeleton(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [skeleton(value) for value in obj]
        return out if isinstance(obj, list) else tuple(out)
    return LEAF if isinstance(obj, torch.Tensor) else obj


def fill(template: Any, plain: Any, where: str = "") -> Any:
    """The live ``template`` (its tensors filled in place) with its plain values from ``plain``;
    KeyError naming the first key the two do not share."""
    if isinstance(template, dict):
        if not isinstance(plain, dict) or set(plain) != set(template):
            theirs = set(plain) if isinstance(plain, dict) else set()
            raise KeyError(f"{where or '/'}: keys {sorted(map(str, set(template) ^ theirs))[:5]} differ")
        return {key: fill(template[key], plain[key], f"{where}/{key}") for key in template}
    if isinstance(template, (list, tuple)):
        if not isinstance(plain, (list, tuple)) or len(plain) != len(template):
            raise KeyError(f"{where}: a list of {len(template)} here, not in the snapshot")
        out = [fill(t, p, f"{where}/{i}") for i, (t, p) in enumerate(zip(template, plain))]
        return out if isinstance(template, list) else tuple(out)
    if isinstance(template, torch.Tensor):
        if plain != LEAF:
            raise KeyError(f"{where}: a tensor here, a plain value in the snapshot")
        return template
    return plain


class MemoryTier:
    """Snapshots of this rank's state on this node (and a replica of them on the next node).

    ``group``: a gloo group of every rank that only the snapshots' background thread uses
    (the replicas travel over it); ``None`` on one process.
    """

    def __init__(self, directory: str | os.PathLike, *, rank: int, world_size: int, layout: dict,
                 replicas: int = 0, group=None):
        self.dir = Path(directory)
        self.rank, self.world_size, self.layout = rank, world_size, dict(layout)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)
        self.local_world = local_world if 0 < local_world <= world_size and world_size % local_world == 0 \
            else world_size
        self.replicas = replicas if self.local_world < world_size else 0
        if replicas and not self.replicas and rank == 0:
            logger.warning("--checkpoint.memory_replicas: the job runs on one node (LOCAL_WORLD_SIZE %d of %d "
                           "ranks); there is no other node to keep a replica on", self.local_world, world_size)
        self.peer_to = (rank + self.local_world) % world_size  # the rank whose host keeps my replica
        self.peer_from = (rank - self.local_world) % world_size  # the rank whose replica I keep
        self.group = group
        self.own = own_slots(self.dir, rank)
        self.held = replica_slots(self.dir, self.peer_from)
        make_slots(self.own + (self.held if self.replicas else []))
        # Straight into the slot's file (no device snapshot: two slots would keep two of them).
        self._stagers = [HostStager(reuse=True, pin_memory=True, device_snapshot="off",
                                    arena_path=str(slot.data)) for slot in self.own]
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cairn-memory")
        self.hashers = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="cairn-memory-hash")
        self._future: concurrent.futures.Future | None = None
        self._queued = threading.Event()
        self._queued.set()
        self._gate = None
        self.taken: list[int] = []  # steps committed on this rank (and replicated)
        self.last_seconds: dict[str, float] = {}  # the last snapshot's phases, seconds after it began
        self._progress = progress_path(self.dir, rank)

    # --- taking snapshots ----------------------------------------------------------------------

    @property
    def in_flight(self) -> bool:
        return self._future is not None and not self._future.done()

    @staticmethod
    def newest(slots: list[Slot]) -> int | None:
        steps = [(slot.record() or {}).get("step", -1) for slot in slots]
        best = max(range(len(slots)), key=lambda i: steps[i])
        return best if steps[best] >= 0 else None

    def prepare(self, state_dict: dict) -> None:
        """Make the buffers of the slot the next snapshot goes to, in the background (the first
        snapshot then finds them: no allocation, pinning or page faults on its path).

        A slot's file is mapped (and sized, and its pages touched) only once its ``COMMITTED``
        is gone: the newest snapshot, which a restart may still need, is never touched."""
        newest = self.newest(self.own)
        index = 1 - newest if newest is not None else 0
        self.own[index].invalidate()

        def job() -> None:
            self._stagers[index].prepare(state_dict)

        self._future = self._executor.submit(job)

    def snapshot(self, step: int, state_dict: dict) -> None:
        """Stage ``state_dict`` into the free slot and commit it (and its replica) in the background.

        Its plain values are taken now; its tensors are copied before ``wait_for_staging``
        returns. Every rank must call this for the same steps (the replicas pair them up)."""
        self.wait(raise_errors=False)
        newest = self.newest(self.own)
        index = 1 - newest if newest is not None else 0
        slot, stager = self.own[index], self._stagers[index]
        slot.invalidate()
        plain = skeleton(state_dict)
        ready = stager.ready_marker()
        self._queued.clear()
        self._gate = None
        start = time.perf_counter()

        def job() -> None:
            record, error = None, None
            try:
                try:
                    staged, gate, drain = stager.enqueue(state_dict, ready)
                    self._gate = gate
                finally:
                    self._queued.set()
                if gate is not None:
                    gate.synchronize()
                drain()
                del staged
                staged_at = time.perf_counter()
                fault_point("during_snapshot", self.rank)
                record = self._commit(slot, stager, plain, step)
                self.last_seconds = {"staged": staged_at - start, "committed": time.perf_counter() - start}
            except Exception as e:  # noqa: BLE001 - the replica exchange still pairs up; raised below
                error = e
            if self.replicas:
                self._exchange_replica(slot if record else None, record)
                self.last_seconds["replicated"] = time.perf_counter() - start
            if error is not None:
                raise error
            self.taken.append(step)

        self._future = self._executor.submit(job)

    def _commit(self, slot: Slot, stager: HostStager, plain: Any, step: int) -> dict:
        buffer = io.BytesIO()
        torch.save(plain, buffer)
        state = buffer.getvalue()
        slot.write_state(state)
        leaves = stager.buffer_layout()
        data_bytes = max([leaf["offset"] + leaf["nbytes"] for leaf in leaves if leaf["offset"] is not None],
                         default=0)
        view = memoryview(stager.arena.mmap)[:data_bytes] if data_bytes else memoryview(b"")
        try:
            chunks = chunk_hashes(view, self.hashers)
        finally:
            view.release()
        record = {"step": step, "rank": self.rank, "world_size": self.world_size, "layout": self.layout,
                  "leaves": leaves, "data_bytes": data_bytes, "chunks": chunks,
                  "state_xxh3": xxhash.xxh3_128(state).hexdigest(), "created_unix": round(time.time(), 3)}
        slot.commit(record)
        return record

    def _exchange_replica(self, slot: Slot | None, record: dict | None) -> None:
        """Send my snapshot to ``peer_to`` and receive ``peer_from``'s into my replica slot of
        theirs that is not the newest (every rank at once). A rank whose snapshot failed sends
        nothing, and its peer keeps its previous replica."""
        newest = self.newest(self.held)
        target = self.held[1 - newest if newest is not None else 0]
        meta = json.dumps(record).encode() if record else b""
        state = slot.read_state() if record else b""
        data_bytes = record["data_bytes"] if record else 0
        incoming = torch.zeros(3, dtype=torch.int64)
        self._sendrecv(torch.tensor([len(meta), len(state), data_bytes], dtype=torch.int64), incoming)
        their_meta_bytes, their_state_bytes, theirs = (int(v) for v in incoming)
        if their_meta_bytes:
            target.invalidate()
        their_meta = torch.empty(their_meta_bytes, dtype=torch.uint8)
        their_state = torch.empty(their_state_bytes, dtype=torch.uint8)
        self._sendrecv(as_bytes(meta), their_meta)
        self._sendrecv(as_bytes(state), their_state)
        mode = "r+b" if target.data.exists() else "w+b"
        with Mapped(slot.data if record else Path(os.devnull), data_bytes) as mine, \
                open(target.data, mode) as f_in:
            into = None
            if theirs:
                f_in.truncate(max(theirs, target.data.stat().st_size))
                into = mmap.mmap(f_in.fileno(), theirs)
            try:
                for start in range(0, max(data_bytes, theirs), TRANSFER_PIECE):
                    out_count = max(0, min(TRANSFER_PIECE, data_bytes - start))
                    in_count = max(0, min(TRANSFER_PIECE, theirs - start))
                    out_piece = torch.frombuffer(mine, dtype=torch.uint8, offset=start, count=out_count) \
                        if out_count else empty()
                    in_piece = torch.frombuffer(into, dtype=torch.uint8, offset=start, count=in_count) \
                        if in_count else empty()
                    self._sendrecv(out_piece, in_piece)
                    del out_piece, in_piece
                    if start == 0:
                        fault_point("during_replica", self.rank)
            finally:
                if into is not None:
                    into.close()
        if their_meta_bytes:
            target.write_state(their_state.numpy().tobytes())
            target.commit(json.loads(their_meta.numpy().tobytes()))

    def _sendrecv(self, out: torch.Tensor, into: torch.Tensor) -> None:
        requests = []
        if out.numel():
            requests.append(dist.isend(out, dst=self.peer_to, group=self.group))
        if into.numel():
            requests.append(dist.irecv(into, src=self.peer_from, group=self.group))
        for request in requests:
            request.wait()

    def wait_for_staging(self) -> None:
        """Before the state changes: the snapshot's copies are queued (GPU: the stream waits for them)."""
        self._queued.wait()
        gate, self._gate = self._gate, None
        if gate is not None:
            torch.cuda.current_stream().wait_event(gate)

    def wait(self, raise_errors: bool = True) -> None:
        future, self._future = self._future, None
        if future is None:
            return
        try:
            future.result()
        except Exception as e:  # noqa: BLE001 - a failed snapshot is logged; the previous one stands
            if raise_errors:
                raise
            logger.warning("memory snapshot failed (%s: %s); the previous one stands", type(e).__name__, e)

    def record_progress(self, step: int) -> None:
        """The last step this rank trained: what a restart counts steps lost from."""
        write_progress(self._progress, step)

    def room_problem(self, nbytes: int) -> str | None:
        """Why this node's folder cannot hold the slots of ``nbytes`` per rank (None: it can).
        The node's ranks share it; pages of a tmpfs are taken when written, so a full one would
        fail a snapshot mid-copy: better said now."""
        slots = [*self.own, *(self.held if self.replicas else [])]
        have = sum(slot.data.stat().st_size for slot in slots if slot.data.exists())
        try:
            info = os.statvfs(self.dir)
        except OSError as e:
            return f"{self.dir}: {e.strerror}"
        free = info.f_bavail * info.f_frsize
        needed = (len(slots) * nbytes - have) * self.local_world
        if needed > free:
            return (f"{self.dir} has {free / 1e9:.2f} GB free; {self.local_world} rank(s) of this node need "
                    f"{needed / 1e9:.2f} GB more for {len(slots)} snapshot slot(s) of {nbytes / 1e9:.2f} GB each")
        return None

    # --- restoring -------------------------------------------------------------------------------

    def inventory(self) -> dict:
        """What this node holds for the restore: my snapshots' steps, the replicas I keep, my progress."""
        def steps(slots: list[Slot]) -> dict[int, int]:
            out = {}
            for index, slot in enumerate(slots):
                record = slot.record()
                if record and record.get("layout") == self.layout and record.get("world_size") == self.world_size:
                    out[record["step"]] = index
            return out

        progress = read_progress(self._progress)
        return {"rank": self.rank, "own": steps(self.own), "held_for": self.peer_from,
                "held": steps(self.held) if self.replicas else {}, "progress": progress}

    def close(self, remove: bool) -> None:
        """Finish the snapshot in flight and stop; ``remove``: delete this rank's snapshots (a finished run)."""
        self.wait(raise_errors=False)
        self._executor.shutdown(wait=True)
        self.hashers.shutdown(wait=True)
        for stager in self._stagers:
            stager.release()
        if remove:
            shutil.rmtree(self.dir / f"rank-{self.rank}", ignore_errors=True)
            shutil.rmtree(self.dir / f"replica-of-{self.peer_from}", ignore_errors=True)
            self._progress.unlink(missing_ok=True)
            try:
                self.dir.rmdir()  # the node's last rank removes the folder
            except OSError:
                pass


def as_bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else empty()


def empty() -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def restore(tier: MemoryTier, disk_step: int | None, template_of: Callable[[], dict],
            apply: Callable[[dict], None], group=None) -> dict | None:
    """Agree with every rank on the newest snapshot at or after ``disk_step`` that each rank can
    get (its own, or the replica another rank keeps), check it everywhere, and load it.

    ``template_of()`` gives the live state dict (its tensors are filled in place), ``apply``
    hands the filled one to the model and states. Returns what was restored (step, tier,
    steps lost, bytes, seconds) or None: then the disk decides. ``group``: a gloo group of
    every rank, used by this (the training) thread only."""
    start = time.perf_counter()
    world = tier.world_size
    mine = tier.inventory()
    inventories = [mine]
    if world > 1:
        inventories = [None] * world
        dist.all_gather_object(inventories, mine, group=group)
    own = {inv["rank"]: inv["own"] for inv in inventories}
    held = {inv["held_for"]: (inv["rank"], inv["held"]) for inv in inventories if inv["held"]}
    progress = max([inv["progress"] for inv in inventories if inv["progress"] is not None], default=None)
    candidates = sorted({s for inv in inventories for s in inv["own"]} | {s for _, h in held.values() for s in h},
                        reverse=True)
    for step in candidates:
        if disk_step is not None and step < disk_step:
            break
        plan = {}  # rank -> ("own", slot index) or ("replica", holder rank, slot index)
        for rank in range(world):
            if step in own.get(rank, {}):
                plan[rank] = ("own", own[rank][step])
            elif rank in held and step in held[rank][1]:
                plan[rank] = ("replica", held[rank][0], held[rank][1][step])
        if len(plan) != world:
            continue
        # "agree": everything before this step's attempt (the inventories, any older attempt)
        phases = {"agree": time.perf_counter() - start}
        problems, nbytes = _restore_step(tier, step, plan, template_of, apply, group, phases)
        if not problems:
            lost = max(0, progress - step) if progress is not None else None
            replicas = sum(1 for how in plan.values() if how[0] == "replica")
            return {"from_step": step, "tier": "replica" if replicas else "memory", "steps_lost": lost,
                    "ranks_from_replicas": replicas, "bytes": nbytes, "path": str(tier.dir),
                    "seconds": round(time.perf_counter() - start, 4),
                    "phases_s": {name: round(value, 4) for name, value in phases.items()}}
        logger.error("memory snapshot of step %d is unusable (%s); trying an older one", step,
                     "; ".join(problems[:3]))
    return None


def _restore_step(tier: MemoryTier, step: int, plan: dict, template_of, apply, group,
                  phases: dict[str, float]) -> tuple[list[str], int]:
    """Every rank gets its bytes (its own slot, or sent by the keeper of its replica) and checks
    them against the live state; only when every rank can is anything loaded. ``phases``
    gets the seconds of each part (check, replicas, state, copy, apply)."""
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[name] = now - clock
        clock = now

    how = plan[tier.rank]
    record, data, state, problems = None, None, None, []
    if how[0] == "own":
        slot = tier.own[how[1]]
        record = slot.record()
        problems = slot.problems(record, tier.hashers) if record else [f"{slot.folder}: no record"]
        if not problems:
            data, state = slot.data, slot.read_state()
    lap("check")
    received = _send_replicas(tier, step, plan, group)
    if how[0] == "replica":
        record, state, data, problems = received
    lap("replicas")
    try:
        template, filled, leaves = None, None, []
        if not problems:
            template = template_of()
            leaves = list(tensor_leaves(template))
            problems = _mismatches(step, record, leaves)
        if not problems:
            filled = fill(template, torch.load(io.BytesIO(state), weights_only=True))
    except (KeyError, RuntimeError, ValueError, EOFError) as e:
        problems = [f"step {step}: the snapshot's state is not this run's ({e})"]
    flag = torch.tensor([1 if problems else 0])
    if tier.world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    lap("state")
    try:
        if problems or int(flag.item()):
            return problems or [f"step {step}: another rank could not use its copy"], 0
        with Mapped(data, record["data_bytes"]) as view:
            for leaf, (_, tensor) in zip(record["leaves"], leaves):
                if leaf["nbytes"]:
                    local = local_tensor(tensor)
                    source = torch.frombuffer(view, dtype=torch.uint8, offset=leaf["offset"], count=leaf["nbytes"])
                    with torch.no_grad():
                        local.copy_(source.view(local.dtype).view(local.shape))
                    del source
        lap("copy")
        apply(filled)
        lap("apply")
        return [], sum(leaf["nbytes"] for leaf in record["leaves"])
    finally:
        if how[0] == "replica" and data is not None:
            Path(data).unlink(missing_ok=True)


def _mismatches(step: int, record: dict, leaves: list[tuple[str, torch.Tensor]]) -> list[str]:
    """How this run's tensors differ from the snapshot's (paths, shapes, dtypes)."""
    saved = record.get("leaves") or []
    if [leaf["path"] for leaf in saved] != [path for path, _ in leaves]:
        return [f"step {step}: the snapshot holds other tensors than this run's state"]
    for leaf, (path, tensor) in zip(saved, leaves):
        local = local_tensor(tensor)
        if list(local.shape) != leaf["shape"] or str(local.dtype).removeprefix("torch.") != leaf["dtype"] \
                or leaf["offset"] is None:
            return [f"step {step}: {path} is {tuple(local.shape)} {local.dtype} here, "
                    f"{tuple(leaf['shape'])} {leaf['dtype']} in the snapshot"]
    return []


def _send_replicas(tier: MemoryTier, step: int, plan: dict, group) -> tuple:
    """Keepers send the replicas ``plan`` uses to their owners, in one order on every rank.
    Returns (record, state bytes, data path, problems) on a rank that receives one."""
    rank = tier.rank
    result = (None, None, None, [])
    for owner, how in sorted(plan.items()):
        if how[0] != "replica":
            continue
        keeper, index = how[1], how[2]
        if rank == keeper:
            slot = tier.held[index]
            record = slot.record()
            problems = slot.problems(record, tier.hashers) if record else [f"{slot.folder}: no record"]
            state = slot.read_state() if not problems else b""
            for payload in (json.dumps({"record": record, "problems": problems}).encode(), state):
                dist.send(torch.tensor([len(payload)], dtype=torch.int64), dst=owner, group=group)
                if payload:
                    dist.send(as_bytes(payload), dst=owner, group=group)
            if not problems:
                with Mapped(slot.data, record["data_bytes"]) as view:
                    for start in range(0, len(view), TRANSFER_PIECE):
                        piece = torch.frombuffer(view, dtype=torch.uint8, offset=start,
                                                 count=min(TRANSFER_PIECE, len(view) - start))
                        dist.send(piece, dst=owner, group=group)
                        del piece
        elif rank == owner:
            payloads = []
            for _ in range(2):
                size = torch.zeros(1, dtype=torch.int64)
                dist.recv(size, src=keeper, group=group)
                buffer = torch.empty(int(size.item()), dtype=torch.uint8)
                if buffer.numel():
                    dist.recv(buffer, src=keeper, group=group)
                payloads.append(buffer.numpy().tobytes())
            meta = json.loads(payloads[0])
            record, problems = meta["record"], meta["problems"]
            landing = tier.own[0].folder.parent / f"from-replica-{step}.bin"
            if not problems:
                with open(landing, "wb") as f:
                    remaining = record["data_bytes"]
                    while remaining:
                        piece = torch.empty(min(TRANSFER_PIECE, remaining), dtype=torch.uint8)
                        dist.recv(piece, src=keeper, group=group)
                        f.write(piece.numpy().data)
                        remaining -= piece.numel()
            result = (record, payloads[1], landing,
                      [f"rank {keeper}'s replica of rank {owner}: {p}" for p in problems])
    return result
