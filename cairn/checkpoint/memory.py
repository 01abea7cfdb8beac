"""The in-memory tier: every few steps each rank's whole training state in host memory that
outlives the training process (``/dev/shm``), and a replica of it on another node.

    --checkpoint.memory_interval K    snapshot every K steps (0: off)
    --checkpoint.memory_replicas 1    also keep a copy on the next node's host (same local rank)
    --checkpoint.memory_dir DIR       where (default /dev/shm/cairn-<uid>-<hash of the folder>-<of the config>)

The files, per node under ``memory_dir``, are ``memory_slots.py``'s, and so is what is trusted
of them (nothing: a private directory, no link followed, bounded reads, records checked whole).

A snapshot is staged into the slot that does not hold the newest snapshot, by the same
background staging as ``async_with_pinned_mem`` (a side stream straight into the slot's
``data.bin``, pinned where CUDA can register it), after ``COMMITTED`` of that slot was removed; ``COMMITTED`` is written last
(a rename), so a snapshot is whole or absent. The replica goes to rank ``r + local world size``
over a gloo group of its own, on the snapshot's worker thread, into a double-buffered replica
slot committed the same way. A snapshot still in flight when the next one is due makes that
one skipped (all ranks agree), never waited for.

On restart all ranks agree on the newest step every rank can get (its own slot, or a replica
held by another rank, sent to it over gloo) that is newer than the newest committed disk step,
of this run (``memory_slots.foreign``), on the same layout, and no later than the rank trained;
each rank checks its copy's checksums and that its states are at that step (``state_problems``),
and any failure makes every rank fall back to the next candidate (one line naming the file and
why), then to disk. Restores are bitwise what was snapshotted. A run that ends normally (its
last step saved) removes its snapshots.

What it costs: host memory of four times the rank's state (two slots of its own, two of the
replica it keeps; two with replicas off), and per snapshot one copy of the state to host
(on GPUs the optimizer step after a snapshot waits for that copy), checksums and the
replica's transfer on a background thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
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

from cairn.checkpoint.errors import CheckpointError
from cairn.checkpoint.faults import fault_point
from cairn.checkpoint import memory_slots
from cairn.checkpoint.memory_slots import (RUN, Mapped, Slot, UnusableSnapshotError, check_record, chunk_hashes,
                                           foreign, landing_file, make_slots, open_private_dir, own_slots,
                                           progress_path, read_progress, read_run, replica_slots, write_progress,
                                           write_run)
from cairn.checkpoint.staging import DeviceBuffers, HostStager, StagedElsewhere, snapshot_fits
from cairn.checkpoint.state import local_tensor, nbytes, tensor_leaves

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

    ``run``: whose snapshots this rank takes and restores (``memory_slots.run_identity`` and the
    run id ``id``). ``group``: a gloo group of every rank that only the snapshots' background
    thread uses (the replicas travel over it); ``None`` on one process.
    """

    def __init__(self, directory: str | os.PathLike, *, rank: int, world_size: int, layout: dict, run: dict,
                 replicas: int = 0, group=None, slots: int = memory_slots.SLOTS, device_snapshot: str = "auto"):
        self.dir = open_private_dir(directory)
        self.rank, self.world_size, self.layout, self.run = rank, world_size, dict(layout), dict(run)
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
        # A third slot where a disk save writes from a snapshot's host copy (``hold``): the slot it
        # writes from, the newest committed one, and the one the next snapshot goes to.
        self.own = own_slots(self.dir, rank, slots)
        self.held = replica_slots(self.dir, self.peer_from)
        make_slots(self.own + (self.held if self.replicas else []))
        if rank % self.local_world == 0 and read_run(self.dir) != self.run:  # one writer per node
            write_run(self.dir, self.run)
        self._started = False  # the first step of this process is not yet recorded (see record_progress)
        self._said_unusable: set[tuple] = set()
        # Straight into the slot's file (pinned), through one device snapshot that the slots share
        # (one snapshot is in flight at a time) where the device has room for it. Unpinned slots
        # drained through pinned pieces and copier threads cost far more (benchmarks/RESULTS.md,
        # session 10: the host copies slowed every step).
        self.device = DeviceBuffers()
        self._stagers = [HostStager(reuse=True, pin_memory=True, device_snapshot=device_snapshot,
                                    arena_path=str(slot.data), device_buffers=self.device) for slot in self.own]
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cairn-memory")
        self._preparer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cairn-memory-prep")
        self._ready = [threading.Event() for _ in self.own]  # a slot's buffers are made (or being made by nobody)
        for event in self._ready:
            event.set()
        workers = max(2, min(8, (os.cpu_count() or 2) // self.local_world - 1))
        self.hashers = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                             thread_name_prefix="cairn-memory-hash")
        self._future: concurrent.futures.Future | None = None
        self._queued = threading.Event()
        self._queued.set()
        self._gate = None
        self._holds: set[int] = set()  # slots a disk save is writing from
        self.taken: list[int] = []  # steps committed on this rank (and replicated)
        self.last_seconds: dict[str, float] = {}  # the last snapshot's phases, seconds after it began
        self._progress = progress_path(self.dir, rank)

    # --- taking snapshots ----------------------------------------------------------------------

    @property
    def in_flight(self) -> bool:
        return self._future is not None and not self._future.done()

    def newest(self, slots: list[Slot]) -> int | None:
        """The index of the slot of ``slots`` (mine or those I keep) holding this run's newest snapshot."""
        steps = [(self.record_of(slot) or {}).get("step", -1) for slot in slots]
        best = max(range(len(slots)), key=lambda i: steps[i])
        return best if steps[best] >= 0 else None

    def record_of(self, slot: Slot) -> dict | None:
        """The slot's record when it holds a snapshot of this run's (its rank's, on this layout)."""
        record = slot.record()
        owner = self.rank if slot in self.own else self.peer_from
        if record is None or foreign(record, self.run, rank=owner, world_size=self.world_size, layout=self.layout):
            return None
        return record

    def when_released(self, callback: Callable[[Any], None]) -> None:
        """``callback(arena)`` before a slot's buffers go (a writer process that maps them unmaps them)."""
        for stager in self._stagers:
            stager.on_release = callback

    def _free_slot(self) -> int:
        """The slot the next snapshot goes to: not the newest committed one, nor one a disk save
        is writing from; of the others the one with the oldest snapshot (or none)."""
        steps = [(slot.record() or {}).get("step", -1) for slot in self.own]
        newest = self.newest(self.own)
        free = [i for i in range(len(self.own)) if i != newest and i not in self._holds]
        if not free:
            raise CheckpointError(f"{self.dir}: every snapshot slot of rank {self.rank} is in use")
        return min(free, key=lambda i: (not self._ready[i].is_set(), steps[i]))

    def prepare(self, state_dict: dict) -> None:
        """Make every slot's buffers on a thread of its own, the next snapshot's first (the
        snapshots then find them: no allocation, pinning or page faults on their path; a snapshot
        due while its slot is still being made is skipped, see ``ready``). Pinning is paced so
        that the training loop's own CUDA calls get through (``HostArena.pin``).

        The newest snapshot, which a restart may still need, is mapped and pinned as it is,
        never written; the others' ``COMMITTED`` are not touched until they are written."""
        newest = self.newest(self.own)
        for index in sorted(range(len(self.own)), key=lambda i: (i == newest, i != self._free_slot())):
            self._ready[index].clear()

            def job(index: int = index) -> None:
                try:
                    self._stagers[index].prepare(state_dict, pace=True)
                except Exception as e:  # noqa: BLE001 - the snapshot makes them instead, and reports
                    logger.warning("could not make the buffers of memory snapshot slot %s in advance (%s: %s)",
                                   self.own[index].folder, type(e).__name__, e)
                finally:
                    self._ready[index].set()

            self._preparer.submit(job)

    @property
    def ready(self) -> bool:
        """Whether the slot the next snapshot goes to has its buffers."""
        return self._ready[self._free_slot()].is_set()

    def snapshot(self, step: int, state_dict: dict, hold: bool = False) -> StagedElsewhere | None:
        """Stage ``state_dict`` into a free slot and commit it (and its replica) in the background.

        Its plain values are taken now; its tensors are copied before ``wait_for_staging``
        returns (on GPUs: into the device snapshot, then to host while training goes on). Every
        rank must call this for the same steps (the replicas pair them up).

        ``hold``: a disk save will write this snapshot's host copy: returns it (a future of the
        staged state dict, set once the copy is complete, and ``release``, to call when the disk
        save is done with it); the slot is not reused until then."""
        self.wait(raise_errors=False, prepared=False)
        index = self._free_slot()
        slot, stager = self.own[index], self._stagers[index]
        slot.invalidate()
        plain = skeleton(state_dict)
        ready = stager.ready_marker()
        self._queued.clear()
        self._gate = None
        start = time.perf_counter()
        host_copy: concurrent.futures.Future = concurrent.futures.Future()
        if hold:
            self._holds.add(index)

        def job() -> None:
            record, error = None, None
            try:
                try:
                    self._ready[index].wait()
                    staged, gate, drain = stager.enqueue(state_dict, ready)
                    self._gate = gate
                finally:
                    self._queued.set()
                if gate is not None:
                    gate.synchronize()
                gated_at = time.perf_counter()

                def landed() -> None:
                    host_copy.set_result(staged)
                    self.last_seconds["staged"] = time.perf_counter() - start

                self.last_seconds = {"gate": gated_at - start}
                record = self._commit(slot, stager, plain, step, drain, landed)
                del staged
                self.last_seconds["committed"] = time.perf_counter() - start
            except Exception as e:  # noqa: BLE001 - the replica exchange still pairs up; raised below
                error = e
                if not host_copy.done():
                    host_copy.set_exception(e)
            if self.replicas:
                self._exchange_replica(slot if record else None, record)
                self.last_seconds["replicated"] = time.perf_counter() - start
            if error is not None:
                raise error
            self.taken.append(step)

        self._future = self._executor.submit(job)
        if not hold:
            return None
        return StagedElsewhere(host_copy, stager, lambda: self._holds.discard(index))

    def _commit(self, slot: Slot, stager: HostStager, plain: Any, step: int, drain: Callable,
                landed: Callable[[], None]) -> dict:
        """Write state.pt, then hash each 64 MiB chunk of data.bin as the host copy lands it,
        then ``COMMITTED``: committed about when the last bytes have landed."""
        buffer = io.BytesIO()
        torch.save(plain, buffer)
        state = buffer.getvalue()
        slot.write_state(state)
        leaves = stager.buffer_layout()
        data_bytes = max([leaf["offset"] + leaf["nbytes"] for leaf in leaves if leaf["nbytes"]], default=0)
        chunk = memory_slots.CHUNK
        view = memoryview(stager.arena.mmap)[:data_bytes] if data_bytes else memoryview(b"")
        hashes: list[concurrent.futures.Future] = []

        def progress(offset: int) -> None:  # the arena's bytes below offset are final
            while len(hashes) * chunk < data_bytes and min((len(hashes) + 1) * chunk, data_bytes) <= offset:
                begin = len(hashes) * chunk
                hashes.append(self.hashers.submit(lambda b=begin: xxhash.xxh3_128(view[b:b + chunk]).hexdigest()))

        try:
            drain(progress)
            progress(data_bytes)
            landed()
            fault_point("during_snapshot", self.rank)
            chunks = [future.result() for future in hashes]
        finally:
            concurrent.futures.wait(hashes)
            view.release()
        record = {"step": step, "rank": self.rank, "world_size": self.world_size, "layout": self.layout,
                  "run": self.run, "leaves": leaves, "data_bytes": data_bytes, "chunks": chunks,
                  "state_bytes": len(state), "state_xxh3": xxhash.xxh3_128(state).hexdigest(),
                  "created_unix": round(time.time(), 3)}
        slot.commit(record)
        return record

    def _exchange_replica(self, slot: Slot | None, record: dict | None) -> None:
        """Send my snapshot to ``peer_to`` and receive ``peer_from``'s into my replica slot of
        theirs that is not the newest (every rank at once). A rank whose snapshot failed sends
        nothing, and its peer keeps its previous replica."""
        newest = self.newest(self.held)
        target = self.held[1 - newest if newest is not None else 0]
        state = b""
        if record:
            try:
                state = slot.read_state(record)
            except (OSError, CheckpointError) as e:  # nothing to send: the peer keeps its previous replica
                logger.warning("memory snapshot replica not sent: %s", e)
                record = None
        meta = json.dumps(record).encode() if record else b""
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
        with Mapped(slot.data if record else Path(os.devnull), data_bytes) as mine, target.open_data(theirs) as f_in:
            into = None
            if theirs:
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

    def wait(self, raise_errors: bool = True, prepared: bool = True) -> None:
        """Until the snapshot in flight is committed (``prepared``: and every slot's buffers are made)."""
        if prepared:
            for event in self._ready:
                event.wait()
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
        """The last step this rank trained: what a restart counts steps lost from.

        The first one of this process also drops what the slots hold of a future this run
        left (a step at or after this one: the restart resumed from an older step) and what is
        not this run's: no later restore can take them, and they would keep the slots."""
        if not self._started:
            self._started = True
            for slot in self.own + (self.held if self.replicas else []):
                record = self.record_of(slot)
                if slot.record() is not None and (record is None or record["step"] >= step):
                    slot.invalidate()
        write_progress(self._progress, step)

    def room_problem(self, nbytes: int) -> str | None:
        """Why this node's folder cannot hold the slots of ``nbytes`` per rank (None: it can).
        The node's ranks share it; pages of a tmpfs are taken when written, so a full one would
        fail a snapshot mid-copy: better said now."""
        slots = [*self.own, *(self.held if self.replicas else [])]
        have = sum(slot.data_bytes_held() for slot in slots)
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
        progress = read_progress(self._progress)

        def steps(slots: list[Slot], owner: int) -> dict[int, int]:
            out = {}
            for index, slot in enumerate(slots):
                try:
                    record = slot.read_record()
                except UnusableSnapshotError as e:
                    self._skip_unusable(slot, str(e))
                    continue
                if record is None:
                    continue
                why = foreign(record, self.run, rank=owner, world_size=self.world_size, layout=self.layout)
                if why is None and progress is not None and record["step"] > progress:
                    why = f"it claims step {record['step']}, but this rank trained only to step {progress}"
                if why:
                    self._skip_unusable(slot, why)
                    continue
                out[record["step"]] = index
            return out

        return {"rank": self.rank, "own": steps(self.own, self.rank), "held_for": self.peer_from,
                "held": steps(self.held, self.peer_from) if self.replicas else {}, "progress": progress}

    def _skip_unusable(self, slot: Slot, why: str) -> None:
        """Say once per slot and reason (the inventory is taken more than once at a start) why a
        snapshot is not restored."""
        if (slot.folder, why) not in self._said_unusable:
            self._said_unusable.add((slot.folder, why))
            logger.warning("memory snapshot %s is unusable: %s; skipping it", slot.folder, why)

    def close(self, remove: bool) -> None:
        """Finish the snapshot in flight and stop; ``remove``: delete this rank's snapshots (a finished run)."""
        self.wait(raise_errors=False)
        self._executor.shutdown(wait=True)
        self._preparer.shutdown(wait=True)
        self.hashers.shutdown(wait=True)
        for stager in self._stagers:
            stager.release()
        if remove:
            shutil.rmtree(self.dir / f"rank-{self.rank}", ignore_errors=True)
            shutil.rmtree(self.dir / f"replica-of-{self.peer_from}", ignore_errors=True)
            self._progress.unlink(missing_ok=True)
            try:  # the node's last rank removes the folder
                if {path.name for path in self.dir.iterdir()} <= {RUN}:
                    (self.dir / RUN).unlink(missing_ok=True)
                self.dir.rmdir()
            except OSError:
                pass


def as_bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else empty()


def empty() -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def restore(tier: MemoryTier, disk_step: int | None, template_of: Callable[[], dict],
            apply: Callable[[dict], None], group=None,
            state_problems: Callable[[dict, int], list[str]] | None = None) -> dict | None:
    """Agree with every rank on the newest snapshot at or after ``disk_step`` that each rank can
    get (its own, or the replica another rank keeps), check it everywhere, and load it.

    ``template_of()`` gives the live state dict (its tensors are filled in place), ``apply``
    hands the filled one to the model and states; ``state_problems(filled, step)`` says why
    the snapshot's plain values cannot be those of step ``step`` (its train state's step, its
    data position). Returns what was restored (step, tier, steps lost, bytes, seconds) or None:
    then the disk decides. ``group``: a gloo group of every rank, used by this (the training)
    thread only."""
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
    candidates = [step for step in candidates if disk_step is None or step >= disk_step]
    for number, step in enumerate(candidates):
        plan = {}  # rank -> ("own", slot index) or ("replica", holder rank, slot index)
        for rank in range(world):
            if step in own.get(rank, {}):
                plan[rank] = ("own", own[rank][step])
            elif rank in held and step in held[rank][1]:
                plan[rank] = ("replica", held[rank][0], held[rank][1][step])
        if len(plan) != world:
            continue
        # "inventory": everything before this step's attempt (the inventories, any older attempt)
        phases = {"inventory": time.perf_counter() - start}
        problems, loaded = _restore_step(tier, step, plan, template_of, apply, group, phases, state_problems)
        if not problems:
            lost = max(0, progress - step) if progress is not None else None
            replicas = sum(1 for how in plan.values() if how[0] == "replica")
            return {"from_step": step, "tier": "replica" if replicas else "memory", "steps_lost": lost,
                    "ranks_from_replicas": replicas, "bytes": loaded, "path": str(tier.dir),
                    "seconds": round(time.perf_counter() - start, 4),
                    "phases_s": {name: round(value, 4) for name, value in phases.items()}}
        after = f"trying step {candidates[number + 1]}" if number + 1 < len(candidates) else \
            "resuming from the folder" if disk_step is not None else "starting without it"
        logger.error("memory snapshot of step %d is unusable: %s; %s", step, "; ".join(problems[:3]), after)
    return None


def _restore_step(tier: MemoryTier, step: int, plan: dict, template_of, apply, group,
                  phases: dict[str, float], state_problems=None) -> tuple[list[str], int]:
    """Every rank gets its bytes (its own slot, or sent by the keeper of its replica), checks them
    against the live state and loads them (``load_checked``); only when every rank can is
    anything handed to the live state. ``phases`` gets the seconds of each part (replicas,
    state, load, agree, copy, apply)."""
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[name] = now - clock
        clock = now

    how = plan[tier.rank]
    record, data, state, problems = None, None, None, []
    where = tier.own[how[1]].folder if how[0] == "own" else f"rank {how[1]}'s replica of rank {tier.rank}"
    if how[0] == "own":
        slot = tier.own[how[1]]
        record = tier.record_of(slot)
        problems = [] if record else [f"{slot.folder}: no record of this run's"]
        if not problems:  # data.bin's chunks are checked as they are loaded (load_checked)
            try:
                data, state = slot.data, slot.read_state(record)
            except UnusableSnapshotError as e:
                problems = [str(e)]
    received = _send_replicas(tier, step, plan, group)
    if how[0] == "replica":
        record, state, data, problems = received
    lap("replicas")
    template, filled, leaves = None, None, []
    if not problems:
        template = template_of()
        leaves = list(tensor_leaves(template))
        problems = [f"{where}: {problem}" for problem in _mismatches(record, leaves)]
    if not problems:
        try:  # anything in a crafted state.pt (weights_only runs none of it) is a reason, never a traceback
            plain = torch.load(io.BytesIO(state), weights_only=True)
        except Exception as e:  # noqa: BLE001
            problems = [f"{where}: its state.pt does not load ({type(e).__name__}: {_first_line(e)})"]
    if not problems:
        try:
            filled = fill(template, plain)
            problems = [f"{where}: {problem}" for problem in (state_problems(filled, step) if state_problems else [])]
        except (KeyError, TypeError, ValueError, RecursionError) as e:
            problems = [f"{where}: its state is not this run's ({_first_line(e)})"]
    lap("state")
    try:
        if _anyone(problems, tier, group):
            return problems or [f"step {step}: another rank could not use its copy"], 0
        problems = load_checked(tier, record, data, [local_tensor(t) for _, t in leaves],
                                lambda ok: not _anyone([] if ok else ["unusable"], tier, group), lap)
        if problems:
            return [f"{where}: {problem}" if not problem.startswith(str(where)) else problem
                    for problem in problems], 0
        try:
            apply(filled)
        except Exception as e:  # noqa: BLE001 - a state refusing its values: the next candidate (or disk) loads over it
            problems = [f"{where}: the states refused its values ({type(e).__name__}: {_first_line(e)})"]
        if _anyone(problems, tier, group):
            return problems or [f"step {step}: another rank's states refused its values"], 0
        lap("apply")
        return [], sum(leaf["nbytes"] for leaf in record["leaves"])
    finally:
        if how[0] == "replica" and data is not None:
            Path(data).unlink(missing_ok=True)


RESTORE_PIECE = 32 << 20  # bytes per host-to-device copy of a restore, through a pinned buffer


def load_checked(tier: MemoryTier, record: dict, data: Path, targets: list[torch.Tensor],
                 agree: Callable[[bool], bool], lap: Callable[[str], None]) -> list[str]:
    """Copy a snapshot's ``data.bin`` into ``targets`` (the live tensors, in the record's leaf
    order) once every chunk's checksum matched on every rank (``agree``).

    At memory speed: the chunks are hashed on ``tier.hashers`` while, on GPUs, the device
    tensors' bytes go to a device copy through pinned pieces filled by several threads; once
    ``agree`` says every rank's copy is sound, that copy goes into the live tensors (device to
    device). Where the device has no room for a copy, the live tensors are written only after
    the checks, as on CPU hosts. Returns the problems (none: loaded)."""
    want = int(record["data_bytes"])
    leaves = [(leaf, target) for leaf, target in zip(record["leaves"], targets) if leaf["nbytes"]]
    on_device = [(leaf, target) for leaf, target in leaves if target.is_cuda]
    on_host = [(leaf, target) for leaf, target in leaves if not target.is_cuda]
    scratch = None
    if on_device:
        named = [(leaf["path"], target) for leaf, target in on_device]
        needed = sum(nbytes(target) for _, target in named)
        free, total = torch.cuda.mem_get_info(on_device[0][1].device)
        if tier.device.holds(named) or snapshot_fits(needed, free, total):
            scratch = tier.device.for_leaves(named)
    mapped = Mapped(data, want)
    try:
        with unmapped_later(mapped) as view:  # a file shorter than recorded: UnusableSnapshotError
            hashes = chunk_hashes_async(view, tier.hashers)
            if scratch is not None:
                _host_to_device(view, [(leaf["offset"], scratch[leaf["path"]]) for leaf, _ in on_device])
            chunks = [future.result() for future in hashes]
            bad = [i for i, (a, b) in enumerate(zip(chunks, record["chunks"])) if a != b]
            problems = [f"{data}: checksum mismatch in {memory_slots.CHUNK >> 20} MiB chunk(s) {bad or 'count'}"] \
                if bad or len(chunks) != len(record["chunks"]) else []
            lap("load")
            if not agree(not problems):
                lap("agree")
                return problems or [f"step {record['step']}: another rank could not use its copy"]
            lap("agree")
            with torch.no_grad():
                if scratch is not None:
                    for leaf, target in on_device:
                        target.copy_(scratch[leaf["path"]])
                    torch.cuda.synchronize()
                else:
                    _host_to_device(view, [(leaf["offset"], target) for leaf, target in on_device])
                for leaf, target in on_host:
                    source = torch.frombuffer(view, dtype=torch.uint8, offset=leaf["offset"], count=leaf["nbytes"])
                    target.copy_(source.view(target.dtype).view(target.shape))
                    del source
    except UnusableSnapshotError as e:
        agree(False)
        return [str(e)]
    finally:
        if scratch is not None:
            tier.device.release()  # back to the caching allocator: the first step's activations may need it
    lap("copy")
    return []


@contextlib.contextmanager
def unmapped_later(mapped: Mapped):
    """``mapped``'s view, unmapped on a thread of its own when done: tearing down the page tables
    of a 16 GB mapping took 0.2-0.3 s of a restore on 1x H200."""
    view = mapped.__enter__()
    try:
        yield view
    finally:
        del view

        def close() -> None:
            with contextlib.suppress(BufferError):
                mapped.__exit__(None, None, None)

        threading.Thread(target=close, name="cairn-unmap", daemon=True).start()


def chunk_hashes_async(view: memoryview, pool: concurrent.futures.Executor) -> list[concurrent.futures.Future]:
    chunk = memory_slots.CHUNK
    return [pool.submit(lambda start=start: xxhash.xxh3_128(view[start:start + chunk]).hexdigest())
            for start in range(0, len(view), chunk)]


def _host_to_device(view: memoryview, targets: list[tuple[int, torch.Tensor]], threads: int = 6) -> None:
    """``targets`` (device tensors, each at its byte offset of ``view``) from host memory that is not
    pinned: ``threads`` threads each fill two reused pinned pieces in turn and queue their copies
    on a stream of their own (on 1x H200, 16 GB in 0.43 s, against 1.6 s of pageable copies;
    benchmarks/results/h200x1_recovery_probe.json)."""
    work, scattered = [], []
    for offset, target in targets:
        if not target.is_contiguous():  # filled whole, then copied into place
            dense = torch.empty(target.shape, dtype=target.dtype, device=target.device)
            scattered.append((target, dense))
            target = dense
        flat = target.reshape(-1).view(torch.uint8)
        for start in range(0, flat.numel(), RESTORE_PIECE):
            work.append((offset + start, flat[start:start + RESTORE_PIECE]))
    if not work:
        return
    device = work[0][1].device
    threads = max(1, min(threads, len(work)))

    def run(index: int) -> None:
        with torch.cuda.device(device):
            stream = torch.cuda.Stream(device)
            pieces = [torch.empty(RESTORE_PIECE, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            events: list[torch.cuda.Event | None] = [None, None]
            with torch.cuda.stream(stream):
                for k, (offset, target) in enumerate(work[index::threads]):
                    if events[k % 2] is not None:
                        events[k % 2].synchronize()
                    count = target.numel()
                    piece = pieces[k % 2][:count]
                    piece.copy_(torch.frombuffer(view, dtype=torch.uint8, offset=offset, count=count))
                    target.copy_(piece, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(stream)
                    events[k % 2] = event
            for event in events:
                if event is not None:
                    event.synchronize()

    with concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cairn-restore") as pool:
        list(pool.map(run, range(threads)))
    for target, dense in scattered:
        target.copy_(dense)


def _anyone(problems: list[str], tier: MemoryTier, group) -> bool:
    """Whether any rank has problems (every rank calls this at the same point)."""
    flag = torch.tensor([1 if problems else 0])
    if tier.world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def _mismatches(record: dict, leaves: list[tuple[str, torch.Tensor]]) -> list[str]:
    """How this run's tensors differ from the snapshot's (paths, shapes, dtypes)."""
    saved = record.get("leaves") or []
    if [leaf["path"] for leaf in saved] != [path for path, _ in leaves]:
        return ["the snapshot holds other tensors than this run's state"]
    for leaf, (path, tensor) in zip(saved, leaves):
        local = local_tensor(tensor)
        if list(local.shape) != leaf["shape"] or str(local.dtype).removeprefix("torch.") != leaf["dtype"] \
                or (leaf["offset"] is None and leaf["nbytes"]):
            return [f"{path} is {tuple(local.shape)} {local.dtype} here, "
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
            record = tier.record_of(slot)
            problems = slot.problems(record, tier.hashers) if record else [f"{slot.folder}: no record of this run's"]
            try:
                state = slot.read_state(record) if not problems else b""
            except UnusableSnapshotError as e:
                problems, state = [str(e)], b""
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
            if not problems:
                try:
                    why = foreign(check_record(record), tier.run, rank=owner, world_size=tier.world_size,
                                  layout=tier.layout)
                except ValueError as e:
                    why = str(e)
                problems = [why] if why else []
            landing = tier.own[0].folder.parent / f"from-replica-{step}.bin"
            if not problems:
                with landing_file(landing) as f:
                    remaining = record["data_bytes"]
                    while remaining:
                        piece = torch.empty(min(TRANSFER_PIECE, remaining), dtype=torch.uint8)
                        dist.recv(piece, src=keeper, group=group)
                        f.write(piece.numpy().data)
                        remaining -= piece.numel()
            result = (record, payloads[1], landing,
                      [f"rank {keeper}'s replica of rank {owner}: {p}" for p in problems])
    return result
