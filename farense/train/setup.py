"""Training setup: config -> base model, LoRA adapters, optimizer and schedule, datasets and batch groups."""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from farense import __version__
from farense.config import ExperimentConfig, TrainingConfig
from farense.errors import ConfigError
from farense.model.blas import describe_blas
from farense.model.compute import apply_compute, cuda_device, current_device, resolve_compute, stored_float_dtype
from farense.model.gguf import resolve_model_dir
from farense.train.batching import batch_groups, choose_align
from farense.train.data import count_too_long, make_datasets
from farense.train.losses import cross_entropy_for, training_loss
from farense.train.prefix_cache import PrefixCache, PrefixChoice, choose_prefix_cache, make_cached_loss

if TYPE_CHECKING:
    import mlx.nn as nn
    import mlx.optimizers as optim

# `training.prefix_cache = "auto"`: the cache may hold at most this share of the memory available after
# the model load (the demo: ~40 MB against gigabytes; a 7B at 2048 tokens: 8 MB an example in bf16).
PREFIX_CACHE_MEMORY_SHARE = 0.25


@dataclass
class Setup:
    """What the loop trains: the model with adapters, its optimizer, the data and the plan."""

    model: nn.Module
    optimizer: optim.Optimizer
    train_set: Any
    valid_set: Any
    train_groups: list
    valid_groups: list
    total_steps: int
    loss: Callable | None = None  # loss(model, batch, lengths): farense.train.losses.training_loss, or the cached one
    train_cache: PrefixCache | None = None  # the frozen prefix's hidden states (None: the prefix cache is off)
    valid_cache: PrefixCache | None = None
    align_tokens: int = 0  # training.align_tokens as chosen for this device: batches' inputs a multiple of it (0: off)


def build_schedule(t: TrainingConfig, total_steps: int) -> Any:
    """Linear warm-up to the peak, then constant, cosine or linear decay (mlx's schedulers)."""
    import mlx.optimizers as optim

    decay_steps = max(total_steps - t.warmup_steps, 1)
    if t.schedule == "cosine":
        main = optim.cosine_decay(t.learning_rate, decay_steps, t.min_learning_rate)
    elif t.schedule == "linear":
        main = optim.linear_schedule(t.learning_rate, t.min_learning_rate, decay_steps)
    else:
        main = t.learning_rate
    if not t.warmup_steps:
        return main
    if not callable(main):
        main = optim.linear_schedule(t.learning_rate, t.learning_rate, 1)
    warm = optim.linear_schedule(0.0, t.learning_rate, t.warmup_steps)
    return optim.join_schedules([warm, main], [t.warmup_steps])


def build_optimizer(config: ExperimentConfig, total_steps: int) -> optim.Optimizer:
    import mlx.optimizers as optim

    t = config.training
    lr = build_schedule(t, total_steps)
    if t.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=t.weight_decay)
    return optim.Adam(learning_rate=lr)


def adapter_config(config: ExperimentConfig) -> dict[str, Any]:
    """adapter_config.json in mlx-lm's format, so mlx_lm.generate/fuse read our adapters as is."""
    params: dict[str, Any] = {"rank": config.lora.rank, "scale": config.lora.scale, "dropout": config.lora.dropout}
    if config.lora.keys:
        params["keys"] = list(config.lora.keys)
    return {
        "model": config.model_path,
        "fine_tune_type": config.lora.type,
        "num_layers": config.lora.num_layers,
        "lora_parameters": params,
        "max_seq_length": config.training.max_seq_length,
        "mask_prompt": config.training.mask_prompt,
        "seed": config.training.seed,
        "farense_fingerprint": config.fingerprint,
    }


def load_base_model(config: ExperimentConfig, log: Callable[[str], None] | None = None) -> tuple[Any, Any]:
    """The base model and tokenizer via mlx-lm, quantized on load when the config asks (QLoRA), then
    dequantized or cast for the device as `model.compute` decides (farense.model.compute)."""
    import mlx.nn as nn
    from mlx_lm.utils import load

    model, tokenizer = load(resolve_model_dir(config),  # a .gguf is imported once into the workspace's cache
                            tokenizer_config={"trust_remote_code": config.model.trust_remote_code})
    if config.model.quantize_bits:
        nn.quantize(model, group_size=config.model.quantize_group_size, bits=config.model.quantize_bits)
    t = config.training
    choice = resolve_compute(model, config.model.compute, tokens_per_step=t.batch_size * t.max_seq_length)
    if log:
        # The BLAS multiplies only on the CPU: on a GPU its line, and its advice, would mislead.
        log(choice.describe() + (f"; {describe_blas()}" if current_device() == "cpu" else ""))
    model = apply_compute(model, choice)
    if choice.dequantize or choice.dtype:
        import mlx.core as mx

        # Now, not inside the first step: layer by layer, so each layer's packed weights are freed
        # as it is done (the peak stays near the dequantized size), and the time is booked to the load.
        for layer in getattr(model, "layers", []):
            mx.eval(layer.parameters())
        mx.eval(model.parameters())
    return model, tokenizer


def attach_adapters(model: nn.Module, config: ExperimentConfig,
                    log: Callable[[str], None] | None = None) -> LoraDtypeChoice:
    """Freeze the base and add LoRA/DoRA layers (initialised from the seed), their matmuls in the dtype
    `lora.matmul_dtype` resolves to on this device (said in the log)."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n_layers = len(model.layers)
    if config.lora.num_layers > n_layers:  # check_inputs catches this first for local models
        raise ConfigError(f"lora.num_layers: requested to train {config.lora.num_layers} layers but the model "
                          f"only has {n_layers} layers (expected 1..{n_layers}, or -1 for all)", source=config.source)
    choice = choose_lora_dtype(config.lora.matmul_dtype, device=current_device(), base_dtype=stored_float_dtype(model),
                               lora_type=config.lora.type)
    mx.random.seed(config.training.seed)
    model.freeze()
    linear_to_lora_layers(model, config.lora.num_layers, adapter_config(config)["lora_parameters"],
                          use_dora=config.lora.type == "dora")
    if choice.dtype != "float32":
        set_lora_matmul_dtype(model, choice.dtype)
    if log:
        log(choice.describe())
    return choice


@dataclass(frozen=True)
class LoraDtypeChoice:
    """The dtype LoRA's matmuls run in, and why (for the run's log)."""

    dtype: str
    reason: str

    def describe(self) -> str:
        if self.dtype == "float32":
            return f"LoRA matmuls: float32 ({self.reason}; mlx-lm's LoRA layer as it is)"
        return (f"LoRA matmuls: {self.dtype} ({self.reason}; the input and the adapters cast inside the call, "
                "the adapters and their optimizer state kept in float32)")


def choose_lora_dtype(requested: str, *, device: str, base_dtype: str | None, lora_type: str = "lora") -> LoraDtypeChoice:
    """`lora.matmul_dtype`: "auto", "float32" or "bfloat16"; `device`: "cpu" or "gpu"; `base_dtype`: the
    dtype the base's floating weights have once its compute is applied (what its activations are in)."""
    if requested != "auto":
        return LoraDtypeChoice(requested, f"lora.matmul_dtype = '{requested}'")
    if lora_type != "lora":
        return LoraDtypeChoice("float32", f"auto: lora.type = '{lora_type}' keeps mlx-lm's matmuls")
    if device == "cpu":
        return LoraDtypeChoice("float32", "auto: on the CPU, where only float32 matmuls reach BLAS")
    if base_dtype == "bfloat16":
        return LoraDtypeChoice("bfloat16", "auto: the base computes in bfloat16 on this GPU")
    return LoraDtypeChoice("float32", f"auto: the base computes in {base_dtype or 'an unknown dtype'}, "
                                      "not bfloat16")


@functools.cache
def lora_cast_class(dtype: str) -> type:
    """mlx-lm's LoRALinear with its two matmuls in `dtype`: the input (after dropout) and lora_a/lora_b are cast
    inside the call, so the parameters, their gradients (the cast's vjp casts back) and the optimizer state stay
    float32 and the adapter files are mlx-lm's. On a GPU with a bf16 base the input is bf16 already; mlx-lm's own
    layer promotes it to float32 instead, for two thin matmuls and their backward."""
    import mlx.core as mx
    from mlx_lm.tuner.lora import LoRALinear

    dt = getattr(mx, dtype)

    class LoRALinearCast(LoRALinear):
        def __call__(self, x: Any) -> Any:
            y = self.linear(x)
            z = (self.dropout(x).astype(dt) @ self.lora_a.astype(dt)) @ self.lora_b.astype(dt)
            return y + (self.scale * z).astype(x.dtype)

    LoRALinearCast.__name__ = LoRALinearCast.__qualname__ = f"LoRALinear_{dtype}"
    return LoRALinearCast


def set_lora_matmul_dtype(model: nn.Module, dtype: str) -> int:
    """Make every mlx-lm LoRALinear of `model` multiply in `dtype` ("float32": mlx-lm's own layer); how many."""
    from mlx_lm.tuner.lora import LoRALinear

    cls = LoRALinear if dtype == "float32" else lora_cast_class(dtype)
    n = 0
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):  # not DoRA's or the MoE layers: their own calls stay
            m.__class__ = cls
            n += 1
    return n


def set_grad_checkpoint(layer_type: type, enabled: bool) -> None:
    """Recompute `layer_type`'s activations in the backward pass (mlx-lm's grad_checkpoint), or not.

    Why not mlx-lm's own: it wraps the class's __call__ again at every call, so a second training
    in one process (a notebook, a bench, a test session) recomputes each layer twice, a third three
    times; and it cannot be undone for a later run that does not want it. This wraps once, with a switch.
    """
    if "_farense_plain_call" not in layer_type.__dict__:
        if not enabled:
            return
        import mlx.core as mx

        plain = layer_type.__call__

        def call(module: Any, *args: Any, **kwargs: Any) -> Any:
            if not type(module)._farense_grad_checkpoint:
                return plain(module, *args, **kwargs)

            def inner(params: Any, *a: Any, **k: Any) -> Any:
                module.update(params)
                return plain(module, *a, **k)

            return mx.checkpoint(inner)(module.trainable_parameters(), *args, **kwargs)

        layer_type._farense_plain_call = plain
        layer_type.__call__ = call
    layer_type._farense_grad_checkpoint = enabled


def library_versions() -> dict[str, str]:
    import mlx.core as mx
    import mlx_lm

    return {"farense": __version__, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
            "python": platform.python_version()}


def plan_total_steps(config: ExperimentConfig, batches_per_epoch: int) -> int:
    t = config.training
    if t.iters:
        return t.iters
    return max((t.epochs * batches_per_epoch) // t.grad_accumulation, 1)


def set_up(config: ExperimentConfig, loaded: dict, log: Callable[[str], None],
           lap: Callable[[str], None] = lambda phase: None) -> Setup:
    """The model, the data, the adapters, the optimizer: everything heavy, after every check passed.

    `lap(phase)` is told when the model load and the rest are done (farense.train.phases)."""
    t = config.training
    log(f"loading {config.model_path}")
    model, tokenizer = load_base_model(config, log)
    lap("model_load")
    datasets = make_datasets(config, tokenizer, loaded)
    train_set, valid_set = datasets["train"], datasets["valid"]
    too_long, longest = count_too_long(train_set, t.max_seq_length)
    if too_long:
        log(f"warning: {too_long} training examples exceed max_seq_length={t.max_seq_length} "
            f"(longest {longest} tokens) and will be truncated")
    attach_adapters(model, config, log)
    set_grad_checkpoint(type(model.layers[0]), t.grad_checkpoint)
    train_groups = batch_groups([len(train_set[i][0]) for i in range(len(train_set))], t.batch_size)
    valid_groups = batch_groups([len(valid_set[i][0]) for i in range(len(valid_set))], t.batch_size)
    total_steps = plan_total_steps(config, len(train_groups))
    optimizer = build_optimizer(config, total_steps)
    optimizer.init(model.trainable_parameters())
    setup = Setup(model, optimizer, train_set, valid_set, train_groups, valid_groups, total_steps)
    align = choose_align(t.align_tokens, cuda=cuda_device())
    log(align.describe())
    setup.align_tokens = align.tokens
    attach_prefix_cache(setup, config, log)
    lap("data_adapters_optimizer")
    return setup


def prefix_cache_budget() -> int:
    """What `auto` lets the prefix cache hold: a share of the memory available now (after the model load)."""
    import psutil

    return int(psutil.virtual_memory().available * PREFIX_CACHE_MEMORY_SHARE)


def attach_prefix_cache(setup: Setup, config: ExperimentConfig, log: Callable[[str], None]) -> PrefixChoice:
    """Decide `training.prefix_cache` for this model, data and device; set the loss and the (empty) caches.

    The caches fill themselves from the batches as the loop first meets them (farense.train.prefix_cache)."""
    t = config.training
    valid_groups = setup.valid_groups if config.validation.batches == -1 else setup.valid_groups[:config.validation.batches]
    lengths = ([len(setup.train_set[i][0]) for g in setup.train_groups for i in g]
               + [len(setup.valid_set[i][0]) for g in valid_groups for i in g])
    on_cpu = current_device() == "cpu"
    choice = choose_prefix_cache(setup.model, t.prefix_cache, lengths=lengths, max_seq_length=t.max_seq_length,
                                 budget_bytes=prefix_cache_budget() if on_cpu else None, on_gpu=not on_cpu)
    log(choice.describe())
    device = "cpu" if on_cpu else "gpu"
    setup.loss = training_loss(device)
    if choice.use:
        setup.loss = make_cached_loss(choice.first, cross_entropy_for(device))
        # With mask_prompt the head (the tied 49152-word one of the demo: the largest part of a step) runs
        # only on the positions whose loss counts: exact (tests/test_prefix_cache.py).
        kw = dict(first=choice.first, head_only_where_counted=t.mask_prompt, align=setup.align_tokens)
        setup.train_cache = PrefixCache(setup.model, setup.train_set, t.max_seq_length, **kw)
        setup.valid_cache = PrefixCache(setup.model, setup.valid_set, t.max_seq_length, **kw)
    return choice
