"""The data order: a pure function of (seed, epoch), so a resumed run continues exactly.

Like mlx-lm's iterate_batches, examples are sorted by length and grouped into batches (less
padding); unlike it, the order of batches in an epoch comes from a generator seeded with
(seed, epoch) rather than numpy's global state, and any position can be reached without building
the batches before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

if TYPE_CHECKING:
    import numpy as np

PAD_TO = 32
# `training.align_tokens = "auto"` on a CUDA GPU: MLX 0.32's CUDA backend runs attention's backward through
# cuDNN only when the sequence is a multiple of 128 (ScaledDotProductAttentionVJP::use_fallback), else through
# an unfused fallback that materialises every layer's score matrix; mlx-lm's widths (1 + a multiple of 32,
# capped at max_seq_length) give inputs of 511 or 2047 tokens.
ALIGN_CUDA = 128


@dataclass(frozen=True)
class AlignChoice:
    """How many tokens the model's input is padded to a multiple of (0: not padded), and why (for the run's log)."""

    tokens: int
    reason: str

    def describe(self) -> str:
        if not self.tokens:
            return f"batch alignment: off ({self.reason})"
        return (f"batch alignment: the model's input padded to a multiple of {self.tokens} tokens, the same "
                f"targets counted ({self.reason})")


def choose_align(requested: int | str, *, cuda: bool) -> AlignChoice:
    """`training.align_tokens`: "auto", 0 (off) or N; `cuda`: the process computes on a CUDA GPU."""
    if requested == "auto":
        if cuda:
            return AlignChoice(ALIGN_CUDA, f"auto: on a CUDA GPU, MLX runs attention's backward through cuDNN "
                                           f"only on sequences of a multiple of {ALIGN_CUDA}")
        return AlignChoice(0, "auto: off where MLX computes on the CPU or Metal; on only on a CUDA GPU")
    if not requested:
        return AlignChoice(0, "training.align_tokens = 0")
    return AlignChoice(int(requested), f"training.align_tokens = {requested}")


@dataclass(frozen=True)
class DataPosition:
    """Where the next micro-batch comes from: epoch and index in that epoch's order."""

    epoch: int
    index: int


def batch_groups(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Example indices grouped into full batches of similar length (a ragged tail is dropped)."""
    if len(lengths) < batch_size:
        raise ValueError(f"the split has {len(lengths)} examples, fewer than batch_size={batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def epoch_order(seed: int, epoch: int, n_batches: int) -> np.ndarray:
    """The permutation of batch groups for one epoch."""
    import numpy as np  # where it is used: importing numpy starts OpenBLAS threads, which must come after
    # the command has blocked preemption signals (farense.signals), so never at import time

    return np.random.default_rng([seed, epoch]).permutation(n_batches)


def position_of(micro_batch: int, batches_per_epoch: int) -> DataPosition:
    """The data position after `micro_batch` micro-batches have been consumed."""
    return DataPosition(micro_batch // batches_per_epoch, micro_batch % batches_per_epoch)


def train_batches(
    dataset: Any,
    groups: list[list[int]],
    *,
    seed: int,
    start: DataPosition,
    max_seq_length: int,
    rank: int = 0,
    world_size: int = 1,
    align: int = 0,
) -> Iterator[tuple[DataPosition, tuple[Any, Any]]]:
    """Endless micro-batches from `start` on; each rank takes its share of every batch (`align`: make_batch's)."""
    epoch, index = start.epoch, start.index
    while True:
        order = epoch_order(seed, epoch, len(groups))
        for i in range(index, len(groups)):
            members = groups[order[i]][rank::world_size]
            yield DataPosition(epoch, i), make_batch(dataset, members, max_seq_length, align)
        epoch, index = epoch + 1, 0


def eval_batches(dataset: Any, groups: list[list[int]], max_seq_length: int, *, rank: int = 0, world_size: int = 1,
                 limit: int = -1, align: int = 0) -> Iterator[tuple[Any, Any]]:
    """Validation batches in a fixed order (no randomness: validation never moves the RNG)."""
    for n, g in enumerate(groups):
        if limit != -1 and n >= limit:
            return
        yield make_batch(dataset, g[rank::world_size], max_seq_length, align)


def make_batch(dataset: Any, members: Sequence[int], max_seq_length: int, align: int = 0) -> tuple[Any, Any]:
    """Pad token lists into an int32 array with (prompt offset, length) pairs, as mlx-lm's loss expects.

    The width is mlx-lm's: 1 + a multiple of PAD_TO, capped at max_seq_length. With `align` > 1 the array
    is widened so that the model's input (every column but the last) is a multiple of `align` tokens,
    and each length is capped at the unaligned width - 1, so the targets counted are exactly the
    unaligned batch's (target step s counts when offset <= s <= length: farense.train.losses.target_mask);
    the extra columns are zeros after every counted position, which causal attention keeps from
    reaching them. The loss, its token count and the gradients are those of the unaligned batch (to the
    bit on the CPU: tests/test_lora_dtype_align.py), except that LoRA dropout, drawing its masks for the
    padded shape, draws others."""
    import mlx.core as mx
    import numpy as np

    items = [dataset[j] for j in members]
    tokens = [it[0] for it in items]
    offsets = [it[1] if len(it) > 1 else 0 for it in items]
    lengths = [min(len(t), max_seq_length) for t in tokens]
    width = min(1 + PAD_TO * ((max(lengths) + PAD_TO - 1) // PAD_TO), max_seq_length)
    padded = width
    if align > 1:
        padded = 1 + align * ((width - 1 + align - 1) // align)
        lengths_counted = [min(n, width - 1) for n in lengths]
    else:
        lengths_counted = lengths
    arr = np.zeros((len(tokens), padded), np.int32)
    for j, t in enumerate(tokens):
        arr[j, : lengths[j]] = t[: lengths[j]]
    return mx.array(arr), mx.array(list(zip(offsets, lengths_counted)))
