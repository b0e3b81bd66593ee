"""The training loss: mlx-lm's default_loss arithmetic, with a cross-entropy chosen for the device.

On the CPU, MLX's x86-64 wheels compute exp one float at a time (no vector exp; a libm fmaf call per
multiply-add), and the cross-entropy over a large vocabulary is mostly exp: the demo's tied
49152-word head spends more time in it than in its matmul (bench/bench_cross_entropy.py). MLX's
logsumexp computes exp in its forward and again in its backward (softmax); written out, the
backward reuses the forward's exp, once per logit instead of twice. On a GPU MLX's fused logsumexp
is the faster one and mlx-lm's own loss is kept. Same value up to float rounding; the cached loss
(farense.train.prefix_cache) uses the same function, so cached and uncached agree to the bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import mlx.core as mx

CrossEntropy = Callable[["mx.array", "mx.array"], "mx.array"]


def cross_entropy_exp_once(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-position cross-entropy (no reduction), as nn.losses.cross_entropy(logits, targets), with
    logsumexp written out so that its gradient reuses the forward's exp."""
    import mlx.core as mx

    top = mx.stop_gradient(logits.max(axis=-1, keepdims=True))  # its gradient cancels: a constant shift
    shifted = logits - top
    log_sum = mx.log(mx.exp(shifted).sum(axis=-1))
    return log_sum - mx.take_along_axis(shifted, mx.expand_dims(targets, -1), axis=-1).squeeze(-1)


def cross_entropy_for(device: str) -> CrossEntropy:
    """`device`: "cpu" or "gpu" (farense.model.compute.current_device)."""
    import mlx.nn as nn

    return cross_entropy_exp_once if device == "cpu" else nn.losses.cross_entropy


def target_mask(targets: mx.array, lengths: mx.array) -> mx.array:
    """Which target steps count, as mlx-lm's default_loss masks them: step s (1-based) counts when
    prompt offset <= s <= length (`lengths` holds (offset, length) pairs)."""
    import mlx.core as mx

    steps = mx.arange(1, targets.shape[1] + 1)
    return mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])


def masked_mean(ce: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """(mean over the counted steps, their number), summed in mlx-lm's order."""
    import mlx.core as mx

    ce = ce * mask
    ntoks = mask.sum()
    return ce.astype(mx.float32).sum() / ntoks, ntoks


def make_default_loss(cross_entropy: CrossEntropy) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """mlx_lm.tuner.trainer.default_loss with this cross-entropy: loss(model, batch, lengths) -> (mean, tokens)."""

    def default_loss(model: Any, batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        targets = batch[:, 1:]
        logits = model(batch[:, :-1])
        return masked_mean(cross_entropy(logits, targets), target_mask(targets, lengths))

    return default_loss


def training_loss(device: str) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """The uncached loss for `device`: mlx-lm's own on a GPU, the same arithmetic with exp once on the CPU."""
    if device == "cpu":
        return make_default_loss(cross_entropy_exp_once)
    from mlx_lm.tuner.trainer import default_loss

    return default_loss
