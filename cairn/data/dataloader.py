"""A stateful, data-parallel loader of packed sequences with a layout-free order.

The order contract (the checkpoint and the trainer rely on it):

- The token stream is cut into N non-overlapping sequences of seq_len + 1 tokens
  (input = [:-1], label = [1:]); a tail shorter than that is dropped.
- One global stream of sequences: position p is sequence ``order(p // N)[p % N]``, where
  ``order(e)`` is a permutation of range(N) that is a pure function of (seed, e) when
  shuffling, the identity otherwise.
- Optimizer step s with global batch G = L x D x A (local batch, data-parallel degree,
  gradient-accumulation steps) takes positions [s*G, (s+1)*G); micro-step m on dp rank r
  takes positions [s*G + m*L*D + r*L, ... + L).

So the sequences of a step depend only on G: one process with L=8 sees what four ranks
with L=2 see between them, and a checkpoint's single integer ``position`` (identical on
every rank) resumes the stream on any layout with the same G and seq_len.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from cairn.config.job_config import DataloaderSection
from cairn.data.datasets import TokenStream, load_token_stream
from cairn.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_REQUIRED_STATE_KEYS = ("position", "global_batch_size", "seq_len", "dataset_fingerprint", "num_sequences")
_RESTART_HINT = ("to restart the data stream from its beginning instead, pass "
                 "--checkpoint.exclude_from_loading dataloader")


def epoch_order(num_sequences: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Sequence indices of one epoch, in the order they are consumed."""
    if not shuffle:
        return np.arange(num_sequences, dtype=np.int64)
    # SeedSequence takes non-negative integers: fold a negative seed into uint64.
    seed_sequence = np.random.SeedSequence([seed % 2**64, epoch])
    return np.random.Generator(np.random.PCG64(seed_sequence)).permutation(num_sequences)


class PackedSequences:
    """A token stream viewed as N rows of seq_len + 1 tokens."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_sequences = len(tokens) // (seq_len + 1)

    def __len__(self) -> int:
        return self.num_sequences

    def rows(self, indices: np.ndarray) -> torch.Tensor:
        """LongTensor[len(indices), seq_len + 1]."""
        offsets = np.asarray(indices, dtype=np.int64)[:, None] * (self.seq_len + 1)
        rows = self.tokens[offsets + np.arange(self.seq_len + 1, dtype=np.int64)]
        return torch.from_numpy(rows.astype(np.int64))


class StatefulDataLoader:
    """Serves this dp rank's micro-batches; ``state_dict()`` is one position for all ranks."""

    def __init__(self, sequences: PackedSequences, *, local_batch_size: int, global_batch_size: int,
                 dp_rank: int, dp_degree: int, seed: int, shuffle: bool, dataset_fingerprint: str):
        self._sequences = sequences
        self.local_batch_size = local_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_degree = dp_degree
        self.seed = seed
        self.shuffle = shuffle
        self.dataset_fingerprint = dataset_fingerprint
        self.position = 0  # sequences consumed by all dp ranks together: the whole state
        self._orders: dict[int, np.ndarray] = {}

    # --- shape of the stream -----------------------------------------------------------

    @property
    def seq_len(self) -> int:
        return self._sequences.seq_len

    @property
    def num_sequences(self) -> int:
        """Sequences per epoch."""
        return len(self._sequences)

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.local_batch_size * self.dp_degree)

    @property
    def epoch(self) -> int:
        return self.position // self.num_sequences

    # --- the order contract ------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            # Keep two: a batch straddles one epoch boundary (more only if G > N: recomputed).
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = epoch_order(self.num_sequences, self.seed, epoch, self.shuffle)
        return self._orders[epoch]

    def sequence_indices(self, start: int, count: int) -> np.ndarray:
        """Sequence indices at global positions [start, start + count)."""
        positions = np.arange(start, start + count, dtype=np.int64)
        epochs = positions // self.num_sequences
        indices = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            indices[in_epoch] = self._epoch_order(int(epoch))[positions[in_epoch] % self.num_sequences]
        return indices

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), each LongTensor[local_batch_size, seq_len], of this rank's
        slice of the next micro-step; then the position moves past every rank's slice."""
        start = self.position + self.dp_rank * self.local_batch_size
        rows = self._sequences.rows(self.sequence_indices(start, self.local_batch_size))
        self.position += self.local_batch_size * self.dp_degree
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    # --- checkpointing (DCP's Stateful protocol) -----------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and strs, identical on every rank (safe for ``weights_only`` loads)."""
        return {
            "position": int(self.position),
            "global_batch_size": int(self.global_batch_size),
            "seq_len": int(self.seq_len),
            "dataset_fingerprint": str(self.dataset_fingerprint),
            "num_sequences": int(self.num_sequences),
            "seed": int(self.seed),
            "shuffle": int(self.shuffle),
        }

    @staticmethod
    def steps_done(state_dict: dict[str, Any]) -> int:
        """The optimizer steps whose batches ``state_dict`` (one of these states') has handed out:
        its position in whole global batches (a memory snapshot claiming another step is refused)."""
        position, batch = state_dict["position"], state_dict["global_batch_size"]
        if type(position) is not int or type(batch) is not int or position < 0 or batch < 1:  # noqa: E721
            raise ValueError(f"position {position!r} of global batches of {batch!r}")
        if position % batch:
            raise ValueError(f"position {position} is not a whole number of global batches of {batch}")
        return position // batch

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = [key for key in _REQUIRED_STATE_KEYS if key not in state_dict]
        if missing:
            raise ValueError(f"dataloader checkpoint state lacks {', '.join(missing)}; {_RESTART_HINT}")
        self._check_compatible(state_dict)
        position = int(state_dict["position"])
        if position < 0:
            raise ValueError(f"dataloader checkpoint state has a negative position ({position})")
        self.position = position
        logger.info("dataloader resumes at sequence %d (epoch %d, %d sequences per epoch)",
                    self.position, self.epoch, self.num_sequences)

    def _check_compatible(self, saved: dict[str, Any]) -> None:
        problems = []
        if int(saved["global_batch_size"]) != self.global_batch_size:
            problems.append(
                f"--training.global_batch_size: the checkpoint was saved with a global batch of "
                f"{saved['global_batch_size']} sequences, this run has {self.global_batch_size}; set "
                f"--training.global_batch_size {saved['global_batch_size']} to resume the same stream")
        if int(saved["seq_len"]) != self.seq_len:
            problems.append(
                f"--training.seq_len: the checkpoint was saved with seq_len {saved['seq_len']}, this run "
                f"has {self.seq_len}; set --training.seq_len {saved['seq_len']} to resume the same stream")
        if problems:
            raise ValueError("cannot resume the dataloader:\n  - " + "\n  - ".join(problems)
                             + f"\n{_RESTART_HINT}")
        if saved["dataset_fingerprint"] != self.dataset_fingerprint:
            logger.warning("the checkpoint's dataset (fingerprint %s, %s sequences) differs from this run's "
                           "(%s, %d sequences): continuing at position %s of the new data",
                           saved["dataset_fingerprint"], saved["num_sequences"], self.dataset_fingerprint,
                           self.num_sequences, saved["position"])
        elif (int(saved.get("seed", self.seed)), bool(saved.get("shuffle", self.shuffle))) != (self.seed, self.shuffle):
            logger.warning("the checkpoint's data order (seed %s, shuffle %s) differs from this run's "
                           "(seed %d, shuffle %s): later epochs follow the new order",
                           saved.get("seed"), bool(saved.get("shuffle")), self.seed, self.shuffle)


def _batch_problems(local_batch_size: int, global_batch_size: int, dp_rank: int, dp_degree: int,
                    seq_len: int) -> list[str]:
    problems = []
    if seq_len < 1:
        problems.append(f"--training.seq_len must be >= 1 (got {seq_len})")
    if local_batch_size < 1:
        problems.append(f"--training.local_batch_size must be >= 1 (got {local_batch_size})")
    if dp_degree < 1 or not 0 <= dp_rank < dp_degree:
        problems.append(f"data-parallel rank {dp_rank} is not in [0, dp degree {dp_degree})")
    if problems:
        return problems
    per_micro_step = local_batch_size * dp_degree
    if global_batch_size < 1 or global_batch_size % per_micro_step:
        problems.append(
            f"--training.global_batch_size {global_batch_size} must be a multiple of "
            f"--training.local_batch_size {local_batch_size} x the data-parallel (dp) degree {dp_degree} "
            f"= {per_micro_step} (the excess is gradient accumulation); try "
            f"--training.global_batch_size {max(1, global_batch_size // per_micro_step) * per_micro_step} "
            f"or -1 for {per_micro_step}")
    return problems


def build_dataloader(config: DataloaderSection, tokenizer: Tokenizer, *, seq_len: int, local_batch_size: int,
                     global_batch_size: int = -1, dp_rank: int = 0, dp_degree: int = 1, seed: int,
                     cache_dir: str | Path | None = None) -> StatefulDataLoader:
    """The loader of ``--dataloader.dataset`` for dp rank ``dp_rank`` of ``dp_degree``.

    ``global_batch_size=-1`` means local_batch_size x dp_degree (no gradient accumulation).
    """
    if global_batch_size == -1:
        global_batch_size = local_batch_size * dp_degree
    problems = _batch_problems(local_batch_size, global_batch_size, dp_rank, dp_degree, seq_len)
    if problems:
        raise ValueError("invalid data-parallel batch layout:\n  - " + "\n  - ".join(problems))
    stream: TokenStream = load_token_stream(config.dataset, config.text_field, tokenizer, cache_dir=cache_dir)
    sequences = PackedSequences(stream.tokens, seq_len)
    if len(sequences) == 0:
        raise ValueError(f"--dataloader.dataset {config.dataset!r} has {len(stream.tokens)} tokens, fewer than "
                         f"one sequence of --training.seq_len {seq_len} + 1")
    if len(sequences) < global_batch_size:
        logger.warning("dataset %s has %d sequences, fewer than one global batch (%d): batches repeat sequences",
                       config.dataset, len(sequences), global_batch_size)
    logger.info("dataset %s: %d documents, %d tokens, %d sequences of %d+1 tokens (fingerprint %s)",
                config.dataset, stream.num_documents, len(stream.tokens), len(sequences), seq_len,
                stream.fingerprint)
    return StatefulDataLoader(sequences, local_batch_size=local_batch_size, global_batch_size=global_batch_size,
                              dp_rank=dp_rank, dp_degree=dp_degree, seed=seed, shuffle=config.shuffle,
                              dataset_fingerprint=stream.fingerprint)
