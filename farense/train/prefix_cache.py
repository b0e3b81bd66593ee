"""The frozen prefix's hidden states, computed once per example and reused at every later step (issue 23).

LoRA sits on the last blocks of a frozen base (the demo: the last 16 of 30 blocks; mlx-lm's default on
a 7B: the last 16 of 32), and dropout lives only inside the LoRA layers. So what enters the first
adapted block is a pure function of the example's tokens: the embedding and the frozen blocks below
it never change and draw no random numbers. This module computes that hidden state once, keeps it,
and afterwards runs only the adapted blocks, the final norm, the output head and the loss.

Exactness. The cache is filled from the very batches the loop trains on (`farense.batching`'s groups
are fixed sets of examples; only their order changes from epoch to epoch), so each example's hidden
state is the same array the uncached step would compute inside that batch. Each example is kept
unpadded (its real positions only) and a batch is reassembled padded with zeros. Under the causal
mask, right padding reaches only padded positions, whose loss is masked out and whose gradients are
exact zeros; so the loss, the gradients and the trained adapters come out the same as without the
cache (bit for bit on the CPU in fp32: tests/test_prefix_cache.py), and since the cached values
depend on nothing but the data and the frozen base, a resumed run refills them to the same bits.

Scope: llama-style models in mlx-lm (`model.model.embed_tokens`, `.layers`, `.norm`, then `lm_head`
or the tied embedding), every block under the same causal mask; `supported(model)` says why not
otherwise (sliding-window layers, scaled embeddings, a trainable embedding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from farense.train.batching import DataPosition, epoch_order, make_batch, train_batches
from farense.train.losses import CrossEntropy, cross_entropy_exp_once, masked_mean, target_mask

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn

# The model classes whose forward is embedding -> blocks under one causal mask -> norm -> head,
# exactly as prefix_hidden + suffix_forward recompose it (checked against each module's source).
SUPPORTED_MODULES = ("mlx_lm.models.llama",)

# `auto`: worth it when at least this share of the blocks is frozen below the first adapted one.
AUTO_MIN_PREFIX_SHARE = 0.25


# ---------------------------------------------------------------------------------------------
# The model split in two


def _inner(model: Any) -> Any:
    return model.model


def _has_trainable(module: Any) -> bool:
    from mlx.utils import tree_flatten

    return bool(tree_flatten(module.trainable_parameters()))


def _has_randomness(module: Any) -> bool:
    """A dropout with p > 0 anywhere in `module` (LoRA layers carry theirs)."""
    import mlx.nn as nn

    found = []

    def visit(_: str, m: Any) -> None:
        if isinstance(m, nn.Dropout) and getattr(m, "_p_1", 1.0) < 1.0:
            found.append(m)

    module.apply_to_modules(visit)
    return bool(found)


def first_adapted_block(model: Any) -> int:
    """Index in `model.model.layers` of the lowest block with a trainable parameter (a LoRA/DoRA
    layer) or a dropout; len(layers) when none has (only the head is adapted, or nothing)."""
    layers = _inner(model).layers
    for i, layer in enumerate(layers):
        if _has_trainable(layer) or _has_randomness(layer):
            return i
    return len(layers)


def head_splits_off(model: Any) -> bool:
    """Whether `model(tokens)` is `head(model, model.model(tokens))` (the llama-style forward)."""
    return type(model).__module__ in SUPPORTED_MODULES


def supported(model: Any) -> str | None:
    """None when the prefix cache is exact for `model`, else why it is not."""
    if not head_splits_off(model):
        module = type(model).__module__
        return f"model class {module}.{type(model).__name__} is not one the prefix cache knows the forward of"
    inner = _inner(model)
    if getattr(inner, "swa_idx", None) is not None:
        return "the model has sliding-window attention layers (their mask differs from the causal one)"
    if _has_trainable(inner.embed_tokens) or _has_randomness(inner.embed_tokens):
        return "the embedding is trained (it belongs to the prefix)"
    if first_adapted_block(model) == 0:
        return "the first block is adapted: there is no frozen prefix"
    return None


def prefix_hidden(model: Any, tokens: mx.array, first: int | None = None) -> mx.array:
    """The hidden states entering block `first` (default: the first adapted one) for a batch of
    input tokens (B, L): the embedding and the frozen blocks below it, under stop_gradient."""
    import mlx.core as mx
    from mlx_lm.models.base import create_attention_mask

    inner = _inner(model)
    first = first_adapted_block(model) if first is None else first
    h = inner.embed_tokens(tokens)
    mask = create_attention_mask(h, None)  # what LlamaModel.__call__ builds without a KV cache
    for layer in inner.layers[:first]:
        h = layer(h, mask, cache=None)
    return mx.stop_gradient(h)


def suffix_hidden(model: Any, hidden: mx.array, mask: Any = None, first: int | None = None) -> mx.array:
    """From the hidden states entering block `first`: the remaining blocks and the final norm, as
    model(tokens) computes them. `mask`: None builds the causal mask LlamaModel builds."""
    from mlx_lm.models.base import create_attention_mask

    inner = _inner(model)
    first = first_adapted_block(model) if first is None else first
    if mask is None:
        mask = create_attention_mask(hidden, None)
    h = hidden
    for layer in inner.layers[first:]:
        h = layer(h, mask, cache=None)
    return inner.norm(h)


def head(model: Any, out: mx.array) -> mx.array:
    """The output head: lm_head, or the tied embedding."""
    if model.args.tie_word_embeddings:
        return _inner(model).embed_tokens.as_linear(out)
    return model.lm_head(out)


def suffix_forward(model: Any, hidden: mx.array, mask: Any = None, first: int | None = None) -> mx.array:
    """Logits from the hidden states entering block `first`: the remaining blocks, the final norm and
    the head (lm_head or the tied embedding), as model(tokens) computes them."""
    return head(model, suffix_hidden(model, hidden, mask, first))


def make_cached_loss(first: int, cross_entropy: CrossEntropy | None = None) -> Callable:
    """A loss with the loop's signature, loss(model, batch, lengths) -> (mean loss, tokens), where
    `batch` is (tokens (B, W), hidden (B, W-1, D)[, rows (S,), weights (S,)]) as `PrefixCache.batch`
    builds it. The same arithmetic as farense.train.losses.make_default_loss(cross_entropy) (the
    loop's uncached loss; default: exp once, the CPU's), from the hidden states on. With `rows`, the
    head and the cross-entropy run only on those flattened positions (every position whose loss
    counts, padded to a multiple of ROWS_ROUND with weight-0 copies of row 0; see `counted_rows`),
    and the cross-entropy is laid back into the full (B, W-1) grid before the same masked sum, so the
    loss and the gradients are those of the whole head to the bit."""
    import mlx.core as mx

    ce_fn = cross_entropy or cross_entropy_exp_once

    def cached_loss(model: Any, batch: tuple[mx.array, ...], lengths: mx.array) -> tuple[mx.array, mx.array]:
        tokens, hidden = batch[0], batch[1]
        targets = tokens[:, 1:]
        out = suffix_hidden(model, hidden, first=first)
        if len(batch) > 2:
            rows, weights = batch[2], batch[3]
            picked = out.reshape(-1, out.shape[-1])[rows]
            ce_rows = ce_fn(head(model, picked), targets.reshape(-1)[rows]) * weights
            ce = mx.zeros((targets.size,), ce_rows.dtype).at[rows].add(ce_rows).reshape(targets.shape)
        else:
            ce = ce_fn(head(model, out), targets)
        return masked_mean(ce, target_mask(targets, lengths))

    return cached_loss


# The head's row count is rounded up to a multiple of this, so a step compiles for few shapes.
ROWS_ROUND = 32


def counted_rows(spans: Sequence[tuple[int, int]], width: int) -> tuple[list[int], int]:
    """The flattened positions (b * width + p) of a batch of `width` model positions whose loss counts,
    for examples with (prompt offset, length) `spans` (make_batch's `lengths`): target step p + 1 counts
    when offset <= p + 1 <= length (farense.train.losses.target_mask), padded with row 0 up to a multiple
    of ROWS_ROUND; returns (rows, how many are real)."""
    rows: list[int] = []
    for b, (offset, length) in enumerate(spans):
        rows.extend(range(b * width + max(offset, 1) - 1, b * width + min(length, width)))
    real = len(rows)
    return rows + [0] * (-real % ROWS_ROUND), real


# ---------------------------------------------------------------------------------------------
# The cache


def stored_positions(length: int, max_seq_length: int) -> int:
    """How many positions of an example of `length` tokens the cache holds: the model's input is a
    batch's tokens but the last column, and make_batch truncates to max_seq_length, so at most
    max_seq_length - 1 (positions beyond an example's length are padding and not kept)."""
    return min(length, max_seq_length - 1)


def estimate_bytes(lengths: Sequence[int], max_seq_length: int, hidden_size: int, dtype_bytes: int) -> int:
    """Bytes the cache holds for examples of these token lengths: positions x hidden x dtype size."""
    return sum(stored_positions(n, max_seq_length) for n in lengths) * hidden_size * dtype_bytes


def hidden_dtype_bytes(model: Any) -> int:
    """Bytes per value of the hidden state: the embedding's output dtype (fp32 on the CPU)."""
    import mlx.core as mx

    emb = _inner(model).embed_tokens
    w = getattr(emb, "weight", None)
    if w is None or not mx.issubdtype(w.dtype, mx.floating):  # quantized embedding: scales' dtype
        w = getattr(emb, "scales", w)
    return w.dtype.size


class PrefixCache:
    """Each example's hidden states entering the first adapted block, unpadded, by example index.

    Filled from whole batches (`batch()` on a miss, or `fill()` ahead) so the values are those the
    uncached step computes for the same batch; read back as a zero-padded batch of the batch's width.
    """

    def __init__(self, model: Any, dataset: Any, max_seq_length: int, first: int | None = None, *,
                 head_only_where_counted: bool = False, align: int = 0) -> None:
        self.model, self.dataset, self.max_seq_length = model, dataset, max_seq_length
        self.align = align  # make_batch's: `fill` computes on the very batches the loop builds
        self.first = first_adapted_block(model) if first is None else first
        self.head_only_where_counted = head_only_where_counted
        self._hidden: dict[int, mx.array] = {}
        self.filled_batches = 0
        self.hits = 0  # batches served without computing the prefix
        self.positions = self.head_positions_skipped = 0  # padded positions served; those the head skipped

    def __len__(self) -> int:
        return len(self._hidden)

    @property
    def nbytes(self) -> int:
        """Bytes held (each entry is its own contiguous buffer)."""
        return sum(h.nbytes for h in self._hidden.values())

    def estimate(self, indices: Sequence[int] | None = None) -> int:
        """Bytes the cache will hold once `indices` (default: the whole dataset) are in it."""
        indices = range(len(self.dataset)) if indices is None else indices
        return estimate_bytes([len(self.dataset[i][0]) for i in indices], self.max_seq_length,
                              self.model.args.hidden_size, hidden_dtype_bytes(self.model))

    def _store(self, members: Sequence[int], tokens: mx.array) -> mx.array:
        """Compute the prefix for the padded batch `tokens` (B, W) of `members` and keep each row."""
        import mlx.core as mx

        h = prefix_hidden(self.model, tokens[:, :-1], self.first)
        rows = [mx.contiguous(h[j, : stored_positions(len(self.dataset[i][0]), self.max_seq_length)])
                for j, i in enumerate(members)]  # a copy each: the padded batch buffer is not kept
        mx.eval(rows)
        for i, row in zip(members, rows):
            self._hidden[i] = row
        self.filled_batches += 1
        return h

    def hidden(self, members: Sequence[int], width: int) -> mx.array:
        """The cached hidden states of `members` as one zero-padded batch (B, width, D)."""
        import mlx.core as mx

        rows = []
        for i in members:
            h = self._hidden[i][:width]
            pad = width - h.shape[0]
            rows.append(mx.pad(h, [(0, pad), (0, 0)]) if pad else h)
        return mx.stack(rows)

    def batch(self, members: Sequence[int], tokens: mx.array) -> tuple[mx.array, ...]:
        """(tokens, hidden[, rows, weights]) for the loss of `make_cached_loss`: the padded batch `tokens`
        of `members` (as farense.batching.make_batch built it) and their hidden states, computed on a
        miss; with head_only_where_counted, the positions the head runs on (`counted_rows`) and their
        weights (0 for the padding rows)."""
        import mlx.core as mx

        missing = [i for i in members if i not in self._hidden]
        if missing:
            self._store(members, tokens)
        else:
            self.hits += 1
        width = tokens.shape[1] - 1
        out = (tokens, self.hidden(members, width))
        if not self.head_only_where_counted:
            return out
        # The counted positions end at stored_positions (at most max_seq_length - 1), as make_batch counts
        # them; the same rows as min(length, max_seq_length) where the batch is not aligned (width - 1 is
        # at most max_seq_length - 1 there), and no padding column of an aligned batch.
        spans = [(it[1] if len(it) > 1 else 0, stored_positions(len(it[0]), self.max_seq_length))
                 for it in (self.dataset[i] for i in members)]
        rows, real = counted_rows(spans, width)
        self.positions += len(members) * width
        self.head_positions_skipped += len(members) * width - real
        weights = mx.array([1.0] * real + [0.0] * (len(rows) - real), dtype=out[1].dtype)
        return out + (mx.array(rows, dtype=mx.int32), weights)

    def fill(self, groups: Sequence[Sequence[int]], *, rank: int = 0, world_size: int = 1) -> None:
        """Compute every group's prefix now (this rank's share of each), batch by batch."""
        for g in groups:
            members = list(g[rank::world_size])
            if any(i not in self._hidden for i in members):
                tokens, _ = make_batch(self.dataset, members, self.max_seq_length, self.align)
                self._store(members, tokens)


# ---------------------------------------------------------------------------------------------
# Batches for the loop: the same order and the same arrays as farense.batching, plus the hidden states


def cached_train_batches(cache: PrefixCache, groups: list[list[int]], *, seed: int, start: DataPosition,
                         max_seq_length: int, rank: int = 0,
                         world_size: int = 1) -> Iterator[tuple[DataPosition, tuple[Any, Any]]]:
    """farense.batching.train_batches with each batch's tokens replaced by (tokens, hidden) (aligned as the cache's)."""
    order, order_epoch = None, None
    for pos, (tokens, lengths) in train_batches(cache.dataset, groups, seed=seed, start=start,
                                                max_seq_length=max_seq_length, rank=rank, world_size=world_size,
                                                align=cache.align):
        if order_epoch != pos.epoch:
            order, order_epoch = epoch_order(seed, pos.epoch, len(groups)), pos.epoch
        members = groups[order[pos.index]][rank::world_size]
        yield pos, (cache.batch(members, tokens), lengths)


def cached_eval_batches(cache: PrefixCache, groups: list[list[int]], max_seq_length: int, *, rank: int = 0,
                        world_size: int = 1, limit: int = -1) -> Iterator[tuple[Any, Any]]:
    """farense.batching.eval_batches with (tokens, hidden) batches (validation's own cache)."""
    for n, g in enumerate(groups):
        if limit != -1 and n >= limit:
            return
        members = g[rank::world_size]
        tokens, lengths = make_batch(cache.dataset, members, max_seq_length, cache.align)
        yield cache.batch(members, tokens), lengths


# ---------------------------------------------------------------------------------------------
# When to use it


@dataclass(frozen=True)
class PrefixChoice:
    """Whether to cache the frozen prefix, and the reason in one line (for the run's log)."""

    use: bool
    first: int
    num_layers: int
    cache_bytes: int
    reason: str

    def describe(self) -> str:
        if not self.use:
            return f"prefix cache: off ({self.reason})"
        return (f"prefix cache: on ({self.reason}): the hidden states entering block {self.first} are computed "
                f"once per example and kept in memory ({self.cache_bytes / 1e6:.1f} MB once filled); every "
                f"later step and validation runs {self.num_layers - self.first} of {self.num_layers} blocks, "
                f"skipping {self.first}")


def choose_prefix_cache(model: Any, requested: str, *, lengths: Sequence[int], max_seq_length: int,
                        budget_bytes: int | None, min_share: float = AUTO_MIN_PREFIX_SHARE,
                        on_gpu: bool = False) -> PrefixChoice:
    """`requested`: "auto", "on" or "off". `lengths`: token lengths of the examples to cache (train and
    validation). `budget_bytes`: what the cache may hold (None: no limit). "on" still refuses a model
    it would not be exact for. "auto": on when the frozen prefix is at least `min_share` of the blocks
    and the cache fits the budget; off on a GPU (`on_gpu`), where its exactness is not checked yet."""
    layers = _inner(model).layers
    n = len(layers)
    why_not = supported(model) if requested != "off" else "off in the config"
    first = first_adapted_block(model) if why_not is None or requested == "off" else 0
    size = estimate_bytes(lengths, max_seq_length, model.args.hidden_size, hidden_dtype_bytes(model))
    if why_not is not None:
        return PrefixChoice(False, first, n, size, why_not)
    share = first / n if n else 0.0
    what = f"blocks 0-{first - 1} of {n} frozen ({share:.0%}), cache {size / 1e6:.1f} MB"
    if requested == "on":
        return PrefixChoice(True, first, n, size, what + ", on in the config")
    if on_gpu:
        return PrefixChoice(False, first, n, size, what + ": auto keeps it off on a GPU until its exactness "
                                                          "is checked there (set training.prefix_cache = 'on')")
    if share < min_share:
        return PrefixChoice(False, first, n, size, what + f": below the {min_share:.0%} that pays")
    if budget_bytes is not None and size > budget_bytes:
        return PrefixChoice(False, first, n, size, what + f": over the {budget_bytes / 1e6:.1f} MB budget "
                                                          "(a share of the available memory)")
    return PrefixChoice(True, first, n, size, what + (f", budget {budget_bytes / 1e6:.0f} MB"
                                                      if budget_bytes is not None else ""))


def describe_savings(train: PrefixCache, valid: PrefixCache | None) -> str:
    """What the cache saved in a run, for its log: batches that ran the adapted blocks only."""
    parts = []
    for name, cache in (("training", train), ("validation", valid)):
        if cache is not None:
            parts.append(f"{name}: {cache.filled_batches} micro-batches filled it, {cache.hits} served from it")
    caches = [c for c in (train, valid) if c is not None]
    held, served = sum(c.nbytes for c in caches), sum(c.hits for c in caches)
    positions, skipped = sum(c.positions for c in caches), sum(c.head_positions_skipped for c in caches)
    head = (f"; the head skipped {skipped} of {positions} positions (prompts under mask_prompt, padding)"
            if train.head_only_where_counted and positions else "")
    return (f"prefix cache: {'; '.join(parts)}; {held / 1e6:.1f} MB held; blocks 0-{train.first - 1} "
            f"({train.first} blocks) skipped in {served} micro-batches{head}")
