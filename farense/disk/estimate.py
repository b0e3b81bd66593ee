"""What a run will write, estimated from the model's config.json before any weight is loaded.

The disk preflight needs the size of one checkpoint long before the trainer could measure one, so
the LoRA tensors are derived from the architecture (hidden size, heads, layers, ...) and the
`[lora]` section exactly as mlx-lm's `linear_to_lora_layers` creates them:

    lora_a (in, rank) and lora_b (rank, out), float32, per adapted Linear; DoRA adds m (out,)
    optimizer (Adam/AdamW): m and v per parameter, float32, plus `step` and `learning_rate`
    checkpoint = adapters.safetensors + optimizer.safetensors + adapter_config.json + state.json
                 + MANIFEST.json

Sizes are file bytes (safetensors headers computed as mlx writes them), not filesystem blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import orjson

from farense.config import ExperimentConfig, LoraConfig, format_size
from farense.errors import ModelImportError
from farense.model.gguf import (
    MODELS_CACHE,
    cache_dir_for,
    hf_config,
    imported_bytes,
    read_header,
    verify_import,
)
from farense.run.checkpoint import RetentionPolicy
from farense.run.layout import RunPaths
from farense.run.objectstore import ObjectStore, RemoteStoreError
from farense.run.remote_restore import plan_restore

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1}

# Files of a checkpoint besides the two safetensors; measured on the trainer's own output
# (state.json carries progress, fingerprint fields and versions; MANIFEST.json one entry per file).
ADAPTER_CONFIG_BYTES = 600
STATE_JSON_BYTES = 4_000
MANIFEST_BYTES = 1_000
# Per optimizer step: metrics.jsonl, training_metrics.json and .csv rows (validation rows are larger).
METRICS_BYTES_PER_STEP = 1_200
# evaluation/ (report, summary, plots), run_state.json, config.json, training_summary.json.
RUN_FILES_BYTES = 4 * 10**6
FALLBACK_STEPS = 1_000

# mlx-lm adapts every Linear of a block when no keys are given; these are the Linears of the
# llama / mistral / qwen2 family (and phi3's fused ones), as (input, output) of each key.
ATTENTION_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_KEYS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LLAMA_KEYS = ATTENTION_KEYS + MLP_KEYS


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer, read from its config.json."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    vocab_size: int
    tie_word_embeddings: bool = False
    dtype_bytes: int = 2
    quant_bits: int | None = None  # mlx-community style "quantization": {"bits", "group_size"}
    quant_group_size: int = 64
    fused_projections: bool = False  # phi3: qkv_proj and gate_up_proj

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], source: str = "config.json") -> "ModelShape":
        """Raises ValueError naming the missing key when the config is not a decoder we know."""
        if isinstance(cfg.get("text_config"), Mapping):  # multimodal wrappers keep the LM inside
            cfg = {**cfg, **cfg["text_config"]}
        need = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
        missing = [k for k in need if not isinstance(cfg.get(k), int)]
        if missing:
            raise ValueError(f"{source}: cannot estimate LoRA sizes, missing integer key(s) {', '.join(missing)}")
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        quant = cfg.get("quantization") or cfg.get("quantization_config") or {}
        bits = quant.get("bits") if isinstance(quant, Mapping) else None
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
        model_type = str(cfg.get("model_type", ""))
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=int(cfg.get("intermediate_size") or 4 * hidden),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            vocab_size=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            dtype_bytes=DTYPE_BYTES.get(dtype.replace("torch.", ""), 2),
            quant_bits=int(bits) if isinstance(bits, int) else None,
            quant_group_size=int(quant.get("group_size", 64)) if isinstance(quant, Mapping) else 64,
            fused_projections=model_type == "phi3",
        )

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(input, output) of every Linear in one block, by mlx-lm module key."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        dims = {
            "self_attn.q_proj": (h, q),
            "self_attn.k_proj": (h, kv),
            "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h),
            "mlp.gate_proj": (h, i),
            "mlp.up_proj": (h, i),
            "mlp.down_proj": (i, h),
        }
        if self.fused_projections:
            return {"self_attn.qkv_proj": (h, q + 2 * kv), "self_attn.o_proj": (q, h),
                    "mlp.gate_up_proj": (h, 2 * i), "mlp.down_proj": (i, h)}
        return dims

    def parameter_count(self) -> int:
        """Parameters of the whole model (embeddings, blocks, norms, output head)."""
        block = sum(a * b for a, b in self.linear_dims().values()) + 2 * self.hidden_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + self.num_hidden_layers * block + self.hidden_size + head

    def weights_bytes(self, bits: int | None = None) -> int:
        """Stored (or in-memory) size of the weights: quantized ones carry a scale and bias per group."""
        bits = bits if bits is not None else self.quant_bits
        n = self.parameter_count()
        if not bits:
            return n * self.dtype_bytes
        return int(n * bits / 8 + n / self.quant_group_size * 2 * 2)  # float16 scales and biases


@dataclass(frozen=True)
class EstimateItem:
    """One thing the run writes, on the filesystem of `path`; bytes None when it cannot be known."""

    name: str
    path: Path
    bytes: int | None
    detail: str = ""


@dataclass(frozen=True)
class RunEstimate:
    """What a run will write and hold, per item, with the per-checkpoint breakdown."""

    model: str
    lora_parameters: int | None
    adapter_bytes: int | None  # one adapters.safetensors
    optimizer_bytes: int | None  # one optimizer.safetensors
    metadata_bytes: int  # adapter_config.json + state.json + MANIFEST.json
    checkpoints_on_disk: int  # keep_last + best + the one being written
    total_steps: int | None
    model_parameters: int | None
    model_stored_bytes: int | None  # weights as stored on disk / downloaded
    model_memory_bytes: int | None  # weights in memory after loading (and on-load quantization)
    items: tuple[EstimateItem, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def checkpoint_bytes(self) -> int | None:
        """One checkpoint directory: what the guard expects the next write to need."""
        if self.adapter_bytes is None or self.optimizer_bytes is None:
            return None
        return self.adapter_bytes + self.optimizer_bytes + self.metadata_bytes

    @property
    def total_bytes(self) -> int:
        return sum(i.bytes or 0 for i in self.items)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "lora_parameters": self.lora_parameters,
            "checkpoint_bytes": self.checkpoint_bytes,
            "adapter_bytes": self.adapter_bytes,
            "optimizer_bytes": self.optimizer_bytes,
            "metadata_bytes": self.metadata_bytes,
            "checkpoints_on_disk": self.checkpoints_on_disk,
            "total_steps": self.total_steps,
            "model_parameters": self.model_parameters,
            "model_stored_bytes": self.model_stored_bytes,
            "model_memory_bytes": self.model_memory_bytes,
            "items": [{"name": i.name, "path": str(i.path), "bytes": i.bytes, "detail": i.detail} for i in self.items],
            "notes": list(self.notes),
        }


def side_by_side(main: RunEstimate, others: Sequence[tuple[str, RunEstimate]]) -> RunEstimate:
    """One estimate for runs that train at the same time: every run's own writes (named after it), the
    files they share (model download or import, the release) once, and the models' memory added up."""
    seen = {(i.name, i.path) for i in main.items}
    items = list(main.items)
    memory = main.model_memory_bytes
    for name, est in others:
        items += [replace(i, name=f"{name}: {i.name}") for i in est.items if (i.name, i.path) not in seen]
        seen |= {(i.name, i.path) for i in est.items}
        memory = None if memory is None or est.model_memory_bytes is None else memory + est.model_memory_bytes
    return replace(main, items=tuple(items), model_memory_bytes=memory)


# --------------------------------------------------------------------------- LoRA tensors


def lora_tensors(shape: ModelShape, lora: LoraConfig) -> tuple[list[tuple[str, tuple[int, ...]]], list[str]]:
    """(name, shape) of every trainable tensor the adapters add, and notes on keys we cannot size."""
    dims = shape.linear_dims()
    keys = list(lora.keys) or list(dims)
    # Model-level modules mlx-lm also adapts when named in keys (outside the blocks).
    top = {} if shape.tie_word_embeddings else {"lm_head": (shape.hidden_size, shape.vocab_size)}
    notes = [f"lora.keys: {k!r} is not a Linear of a {shape.model_type or 'llama-like'} block; not counted"
             for k in keys if k not in dims and k not in top]
    n = shape.num_hidden_layers if lora.num_layers == -1 else min(lora.num_layers, shape.num_hidden_layers)
    out: list[tuple[str, tuple[int, ...]]] = []
    for layer in range(shape.num_hidden_layers - n, shape.num_hidden_layers):
        for key in keys:
            if key not in dims:
                continue
            d_in, d_out = dims[key]
            prefix = f"model.layers.{layer}.{key}"
            out.append((f"{prefix}.lora_a", (d_in, lora.rank)))
            out.append((f"{prefix}.lora_b", (lora.rank, d_out)))
            if lora.type == "dora":
                out.append((f"{prefix}.m", (d_out,)))
    for key in keys:
        if key in top:
            d_in, d_out = top[key]
            out.append((f"{key}.lora_a", (d_in, lora.rank)))
            out.append((f"{key}.lora_b", (lora.rank, d_out)))
            if lora.type == "dora":
                out.append((f"{key}.m", (d_out,)))
    return out, notes


def safetensors_bytes(tensors: Iterable[tuple[str, tuple[int, ...], str, int]]) -> int:
    """Size of a safetensors file as mx.save_safetensors writes it: 8-byte length, JSON header, data."""
    header = len('{"__metadata__":null}')
    offset = 0
    for name, shp, dtype, itemsize in sorted(tensors):
        nbytes = math.prod(shp) * itemsize
        dims = ",".join(str(d) for d in shp)
        header += len(f',"{name}":{{"data_offsets":[{offset},{offset + nbytes}],"dtype":"{dtype}","shape":[{dims}]}}')
        offset += nbytes
    return 8 + header + offset


def checkpoint_sizes(shape: ModelShape, lora: LoraConfig) -> tuple[int, int, int, list[str]]:
    """(LoRA parameters, adapters.safetensors bytes, optimizer.safetensors bytes, notes)."""
    tensors, notes = lora_tensors(shape, lora)
    params = sum(math.prod(s) for _, s in tensors)
    adapters = safetensors_bytes((n, s, "F32", 4) for n, s in tensors)
    opt = [(f"{n}.{m}", s, "F32", 4) for n, s in tensors for m in ("m", "v")]
    opt += [("step", (), "U64", 8), ("learning_rate", (), "F32", 4)]
    return params, adapters, safetensors_bytes(opt), notes


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelSource:
    """Where the model's config.json was found and how much of the model still has to be downloaded."""

    config: dict[str, Any] | None
    download_bytes: int | None  # 0 for a local directory or a complete cached snapshot
    cache_dir: Path | None  # the Hugging Face cache a hub model lands in
    note: str = ""
    import_dir: Path | None = None  # a .gguf model: where its MLX import lives (farense.model.gguf's cache)
    import_bytes: int | None = None  # what that import still has to write (0 once imported)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache (HF_HUB_CACHE / HF_HOME aware), without touching the network."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def locate_model(config: ExperimentConfig, *, cache_dir: Path | None = None, allow_network: bool = False) -> ModelSource:
    """config.json of the model and the bytes still to download, reading only small files."""
    if config.model_is_local and config.model_path.lower().endswith(".gguf"):
        return _gguf_source(config)
    if config.model_is_local:
        p = Path(config.model_path) / "config.json"
        try:
            return ModelSource(orjson.loads(p.read_bytes()), 0, None)
        except (OSError, orjson.JSONDecodeError) as exc:
            return ModelSource(None, 0, None, f"model config {p} unreadable ({exc}); checkpoint size unknown")
    repo = config.model.path
    cache = cache_dir or hf_cache_dir()
    cfg = _cached_json(repo, "config.json", cache)
    if cfg is None and allow_network:
        try:
            from huggingface_hub import hf_hub_download

            cfg = orjson.loads(Path(hf_hub_download(repo, "config.json", cache_dir=cache)).read_bytes())
        except Exception as exc:  # network, auth, missing repo: the estimate says "unknown"
            return ModelSource(None, None, cache, f"{repo}: config.json could not be fetched ({exc})")
    if cfg is None:
        return ModelSource(None, None, cache,
                           f"{repo}: not in the Hugging Face cache ({cache}); checkpoint and download sizes unknown "
                           "(allow network access to fetch its config.json)")
    return ModelSource(cfg, _download_bytes(repo, cfg, cache), cache)


def _gguf_source(config: ExperimentConfig) -> ModelSource:
    """A .gguf model: its shape from the file's header, and the bytes its import will write if not done yet."""
    try:
        header = read_header(config.model_path)
        cfg = hf_config(header)
        dest = cache_dir_for(config.model_path, Path(config.workspace) / MODELS_CACHE)
    except ModelImportError as exc:
        return ModelSource(None, 0, None, f"{exc}; checkpoint size unknown")
    pending = 0 if verify_import(dest) else imported_bytes(header)
    return ModelSource(cfg, 0, None, import_dir=dest, import_bytes=pending)


def _cached(repo: str, filename: str, cache: Path) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo, filename, cache_dir=cache)
    except Exception:
        return None
    return Path(hit) if isinstance(hit, str) else None


def _cached_json(repo: str, filename: str, cache: Path) -> dict[str, Any] | None:
    p = _cached(repo, filename, cache)
    if p is None:
        return None
    try:
        data = orjson.loads(p.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _download_bytes(repo: str, cfg: Mapping[str, Any], cache: Path) -> int | None:
    """Weights not yet in the cache: from the cached index's total_size, else from the config."""
    index = _cached_json(repo, "model.safetensors.index.json", cache)
    if index is not None:
        files = sorted(set((index.get("weight_map") or {}).values()))
        total = (index.get("metadata") or {}).get("total_size")
        have = [f for f in files if _cached(repo, f, cache) is not None]
        if files and len(have) == len(files):
            return 0
        if isinstance(total, int):
            done = sum(_cached(repo, f, cache).stat().st_size for f in have)  # type: ignore[union-attr]
            return max(total - done, 0)
    elif _cached(repo, "model.safetensors", cache) is not None:
        return 0
    try:
        return ModelShape.from_config(cfg).weights_bytes()
    except ValueError:
        return None


# --------------------------------------------------------------------------- the run


def count_lines(path: Path) -> int | None:
    """Non-empty lines of a JSONL file (examples), or None if it is not there."""
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None


def planned_steps(config: ExperimentConfig) -> int | None:
    """Optimizer steps the run will take: iters, or epochs over the training split."""
    t = config.training
    if t.iters:
        return t.iters
    n = count_lines(config.data_dir / "train.jsonl")
    if n is None:
        return None
    return max(t.epochs * math.ceil(n / t.batch_size) // t.grad_accumulation, 1)


def estimate_run(
    config: ExperimentConfig,
    *,
    include_fused: bool = False,
    cache_dir: Path | None = None,
    allow_network: bool = False,
) -> RunEstimate:
    """Bytes the run will write per item and filesystem, and the memory its model needs; loads no weights."""
    source = locate_model(config, cache_dir=cache_dir, allow_network=allow_network)
    notes = [source.note] if source.note else []
    shape: ModelShape | None = None
    if source.config is not None:
        try:
            shape = ModelShape.from_config(source.config, source=f"{config.model.path}/config.json")
        except ValueError as exc:
            notes.append(str(exc))
    lora_params = adapter_b = optimizer_b = None
    if shape is not None:
        lora_params, adapter_b, optimizer_b, key_notes = checkpoint_sizes(shape, config.lora)
        notes += key_notes
    metadata_b = ADAPTER_CONFIG_BYTES + len(config.model_path) + STATE_JSON_BYTES + MANIFEST_BYTES
    ck = config.checkpoint
    on_disk = RetentionPolicy.from_config(ck).most_on_disk
    steps = planned_steps(config)
    if steps is None:
        notes.append(f"{config.data_dir / 'train.jsonl'} not found: metrics sized for {FALLBACK_STEPS} steps")

    run = config.run_dir
    per_ckpt = None if adapter_b is None else adapter_b + optimizer_b + metadata_b  # type: ignore[operator]
    items = [
        EstimateItem("checkpoints", run / "checkpoints", None if per_ckpt is None else per_ckpt * on_disk,
                     f"{on_disk} x {format_size(per_ckpt) if per_ckpt is not None else '?'} "
                     f"(keep_last {ck.keep_last}{' + best' if ck.keep_best else ''} + one being written)"),
        # The best adapters are replaced through a temporary copy: twice the file at the moment of the swap.
        EstimateItem("final adapters", run / "adapters", None if adapter_b is None else 2 * adapter_b + 1_000,
                     "adapters.safetensors (+ its temporary copy while replaced)"),
        EstimateItem("metrics and logs", run, (steps or FALLBACK_STEPS) * METRICS_BYTES_PER_STEP + RUN_FILES_BYTES,
                     f"{steps or FALLBACK_STEPS} steps x {format_size(METRICS_BYTES_PER_STEP)} + evaluation and plots"),
        EstimateItem("release", config.production_dir, None if adapter_b is None else adapter_b + RUN_FILES_BYTES,
                     "adapters and reports copied on promotion"),
    ]
    stored = memory = params = None
    if shape is not None:
        params = shape.parameter_count()
        stored = shape.weights_bytes()
        memory = shape.weights_bytes(config.model.quantize_bits or None) if config.model.quantize_bits else stored
        if include_fused:
            items.append(EstimateItem("fused model", run / "fused", stored, "base weights with adapters merged"))
    if source.import_dir is not None:
        items.append(EstimateItem("imported model", source.import_dir, source.import_bytes,
                                  "already imported" if source.import_bytes == 0
                                  else f"{Path(config.model_path).name} imported into MLX's format"))
    if not config.model_is_local:
        items.append(EstimateItem("model download", source.cache_dir or hf_cache_dir(), source.download_bytes,
                                  "already cached" if source.download_bytes == 0 else f"{config.model.path} weights"))
    items += remote_restore_items(config)
    return RunEstimate(
        model=config.model_path,
        lora_parameters=lora_params,
        adapter_bytes=adapter_b,
        optimizer_bytes=optimizer_b,
        metadata_bytes=metadata_b,
        checkpoints_on_disk=on_disk,
        total_steps=steps,
        model_parameters=params,
        model_stored_bytes=stored,
        model_memory_bytes=memory,
        items=tuple(items),
        notes=tuple(notes),
    )


# A preflight must not hang on a store that does not answer: one short try, the item's size unknown then.
REMOTE_PLAN_TIMEOUT_S = 10.0


def remote_restore_items(config: ExperimentConfig) -> list[EstimateItem]:
    """With `[storage] remote`: the checkpoint a restore downloads before training when the local run is
    behind the store (farense.run.remote_restore.plan_restore); nothing when it is not."""
    if not config.storage.remote:
        return []
    checkpoints = RunPaths(config.run_dir).checkpoints
    try:
        store = ObjectStore.at(config.storage.remote, request_timeout_s=REMOTE_PLAN_TIMEOUT_S,
                            client_retries=0)
        plan = plan_restore(store, store.key("runs", config.run_name), checkpoints)
    except RemoteStoreError as exc:
        return [EstimateItem("remote restore", checkpoints, None, f"{config.storage.remote} not read: {exc}")]
    if not plan.candidates:
        return []
    local = "no local checkpoint" if plan.local_step is None else f"local step {plan.local_step}"
    return [EstimateItem("remote restore", checkpoints, plan.download_bytes,
                         f"step {plan.candidates[0].step} from {config.storage.remote} ({local}), the largest of "
                         f"{len(plan.candidates)} candidates")]
