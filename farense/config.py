"""Experiment configs: TOML files loaded into frozen, typed, validated objects.

A config may `extends = "other.toml"` (or a list, applied left to right) so that V2 reads as V1
plus its changes. Every problem in a file is gathered and reported at once, naming the file,
the key and what is expected, before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import orjson

from farense.errors import ConfigError

# --------------------------------------------------------------------------- sizes


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
    "p": 10**15, "pb": 10**15, "pib": 2**50,
}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as "20GB", "512MiB", "1.5 GB"."""
    if isinstance(value, bool):
        raise ValueError("expected a size (bytes, or a string such as '20GB'), got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected a size >= 0, got {value}")
        return value
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size such as 20GB, 512MiB or a number of bytes, got {value!r}")
    n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(n):
        raise ValueError(f"expected a size such as 20GB, got {value!r}, which is too large")
    return int(n)


def format_size(n: float) -> str:
    """Human-readable bytes (decimal units, as disks are sold and `df -H` prints)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Size(int):
    """A byte count that a config may write as "20GB"."""


# A field that takes "auto" or an integer (training.align_tokens): its Check says which values.
AutoInt = typing.Union[int, str]


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Check:
    """A field's rule: `ok(value)`, and what is expected, as the error message says it."""

    ok: Callable[[Any], bool]
    expected: str


def at_least(n: int, note: str = "") -> Check:
    return Check(lambda v: v >= n, f"an integer >= {n}{note}")


def number(op: str, n: float) -> Check:
    """A number > n or >= n; NaN never passes."""
    return Check((lambda v: v > n) if op == ">" else (lambda v: v >= n), f"a number {op} {n:g}")


def one_of(*options: Any, text: str | None = None) -> Check:
    return Check(lambda v: v in options, text or f"one of {', '.join(map(str, options))}")


def _f(default: Any, help: str, check: Check | None = None, **kw: Any) -> Any:
    meta = {"help": help, "check": check, **kw}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class _Section:
    """A config section validates itself: each field's Check, then the rules that join fields (`cross`)."""

    section: typing.ClassVar[str] = ""

    def problems(self) -> list[str]:
        out, out_of_range = [], False
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            check, value = f.metadata.get("check"), getattr(self, f.name)
            if not _in_range(value):  # before the field's own rule: NaN would pass or fail it by accident
                out_of_range = True
                out.append(f"{self.section}.{f.name}: expected {_RANGE_EXPECTED[type(value) is float]}, "
                           f"got {value!r}")
            elif check is not None and not check.ok(value):
                got = "nothing" if value == "" else repr(value)
                out.append(f"{self.section}.{f.name}: expected {check.expected}, got {got}")
        return out + ([] if out_of_range else self.cross())  # joint rules compare numbers, never NaN

    def cross(self) -> list[str]:
        return []


# Every number a config holds is finite and fits 64 bits (TOML's integers, JSON readers, the fingerprint).
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
_RANGE_EXPECTED = {True: "a finite number (not nan or inf)",
                   False: f"an integer from {INT_MIN} to {INT_MAX} (64 bits)"}


def _in_range(value: Any) -> bool:
    """A float is finite and an int fits 64 bits; other values have no range here."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return INT_MIN <= value <= INT_MAX
    return True


# What a quantized base computes in (model.compute); farense.model.compute acts on it.
COMPUTE_MODES = ("auto", "quantized", "dequantized")


@dataclass(frozen=True)
class ModelConfig(_Section):
    section = "model"
    path: str = _f("", "Local model directory (Hugging Face layout), a .gguf file (imported once into "
                       ".farense/models) or a Hugging Face repo id.",
                   Check(bool, "a model directory or a Hugging Face repo id"))
    quantize_bits: int = _f(0, "Quantize the base model on load: 0 keeps it as stored, 4 or 8 for QLoRA.",
                            one_of(0, 4, 8, text="0, 4 or 8"))
    quantize_group_size: int = _f(64, "Group size for on-load quantization (32, 64 or 128).",
                                  one_of(32, 64, 128, text="32, 64 or 128"))
    trust_remote_code: bool = _f(False, "Allow tokenizer code shipped with the model.")
    compute: str = _f("auto", "What a quantized base computes in: 'quantized' (QLoRA, 4-bit matmuls), 'dequantized' "
                              "(dequantized once at load: faster where memory allows), or 'auto' (dequantized when "
                              "the device's memory holds it with headroom and, on a GPU, a step has enough work "
                              "for it to pay; always on the CPU, in fp32).",
                   one_of(*COMPUTE_MODES))


@dataclass(frozen=True)
class DataConfig(_Section):
    section = "data"
    dir: str = _f("", "Directory with train.jsonl, valid.jsonl and test.jsonl (mlx-lm formats).",
                  Check(bool, "a directory with train.jsonl and valid.jsonl"))
    chat_feature: str = _f("messages", "Key of the chat messages list in chat data.")
    prompt_feature: str = _f("prompt", "Key of the prompt in prompt/completion data.")
    completion_feature: str = _f("completion", "Key of the completion in prompt/completion data.")
    text_feature: str = _f("text", "Key of the text in plain-text data.")


# The dtypes LoRA's matmuls may run in (lora.matmul_dtype); farense.train.setup acts on it.
LORA_MATMUL_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class LoraConfig(_Section):
    section = "lora"
    type: str = _f("lora", "Adapter type: lora or dora.", one_of("lora", "dora", text="'lora' or 'dora'"))
    rank: int = _f(8, "LoRA rank (r).", at_least(1))
    scale: float = _f(20.0, "LoRA scale (mlx-lm's name; other frameworks call alpha/r the scale).", number(">", 0))
    dropout: float = _f(0.0, "Dropout on the LoRA input, 0 <= dropout < 1.",
                        Check(lambda v: 0.0 <= v < 1.0, "0 <= dropout < 1"))
    num_layers: int = _f(16, "How many of the last transformer blocks get adapters (-1: all).",
                         Check(lambda v: v > 0 or v == -1, "a positive number of layers or -1 for all"))
    keys: list[str] = _f([], "Module keys to adapt (e.g. self_attn.q_proj); empty: every linear layer, as mlx-lm does.")
    matmul_dtype: str = _f("auto", "The dtype LoRA's two matmuls (x A, then B) run in; the adapters and the optimizer "
                                   "state stay float32 either way. 'float32' (mlx-lm's: a bf16 input is promoted), "
                                   "'bfloat16' (the input and the adapters cast to bf16 inside the call), or 'auto' "
                                   "(the dtype the base computes in: bf16 for a bf16 or dequantized 4-bit base on a "
                                   "GPU, float32 on the CPU, where nothing changes).",
                           one_of(*LORA_MATMUL_DTYPES))

    def cross(self) -> list[str]:
        if self.type == "dora" and self.matmul_dtype == "bfloat16":
            return ["lora.matmul_dtype: 'bfloat16' applies to lora.type = 'lora' only (DoRA's layer keeps mlx-lm's "
                    "float32 matmuls); expected 'auto' or 'float32' with 'dora'"]
        return []


SCHEDULES = ("constant", "cosine", "linear")
PREFIX_CACHE_MODES = ("auto", "on", "off")
OPTIMIZERS = ("adam", "adamw")


def _align_ok(v: Any) -> bool:
    """training.align_tokens: "auto", or a number of tokens >= 0 (0: off)."""
    return v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)


@dataclass(frozen=True)
class TrainingConfig(_Section):
    section = "training"
    batch_size: int = _f(4, "Examples per micro-batch (split across ranks in distributed runs).", at_least(1))
    grad_accumulation: int = _f(1, "Micro-batches accumulated into one optimizer step.", at_least(1))
    learning_rate: float = _f(1e-5, "Peak learning rate.", number(">", 0))
    schedule: str = _f("constant", "Learning-rate schedule after warm-up: constant, cosine or linear decay.",
                       one_of(*SCHEDULES))
    warmup_steps: int = _f(0, "Optimizer steps of linear warm-up from 0 to learning_rate.", at_least(0))
    min_learning_rate: float = _f(0.0, "Learning rate at the end of a cosine or linear decay.")
    optimizer: str = _f("adam", "adam or adamw.", one_of(*OPTIMIZERS))
    weight_decay: float = _f(0.0, "Weight decay (adamw only).", number(">=", 0))
    iters: int = _f(0, "Optimizer steps to run; set this or epochs, not both.")
    epochs: int = _f(0, "Passes over the training split; set this or iters, not both.")
    max_seq_length: int = _f(2048, "Longer examples are truncated (data validation counts them).", at_least(8))
    seed: int = _f(0, "Seed for weights init, dropout and the data order.", at_least(0))
    grad_checkpoint: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    mask_prompt: bool = _f(False, "Compute the loss on the answer only.")
    prefix_cache: str = _f("auto", "Keep each example's hidden states below the first adapted block (computed once, "
                                   "in memory) and run only the adapted blocks afterwards: exact, the same adapters to "
                                   "the bit on the CPU. 'on', 'off', or 'auto' (on the CPU when at least a quarter "
                                   "of the blocks is frozen below the first adapted one and the cache fits a share "
                                   "of the available memory; off on a GPU until its exactness is checked there).",
                           one_of(*PREFIX_CACHE_MODES))
    align_tokens: AutoInt = _f("auto", "Pad each batch so that the model's input (the batch less its last column) is a "
                                       "multiple of this many tokens, the targets counted unchanged: the padding sits "
                                       "after every counted position, where causal attention keeps it from reaching "
                                       "them, so the loss, its token count and the gradients are the same (to the bit "
                                       "on the CPU), except that LoRA dropout draws its masks for the padded shape "
                                       "(other draws, the same distribution). 0: off (batches 1 + a multiple of 32 "
                                       "wide, as mlx-lm's). 'auto': 128 on a CUDA GPU, where MLX runs attention's "
                                       "backward through cuDNN only on sequences of a multiple of 128 (else an "
                                       "unfused fallback); off elsewhere.",
                               Check(_align_ok, "'auto', 0 (off) or a positive number of tokens"))

    def cross(self) -> list[str]:
        out = []
        if self.min_learning_rate < 0 or 0 < self.learning_rate < self.min_learning_rate:  # a bad lr is reported once
            out.append(
                f"training.min_learning_rate: expected 0 <= min_learning_rate <= learning_rate "
                f"({self.learning_rate}), got {self.min_learning_rate}"
            )
        if self.iters < 0 or self.epochs < 0:
            out.append("training.iters / training.epochs: expected numbers >= 0")
        elif (self.iters > 0) == (self.epochs > 0):
            out.append(
                f"training.iters / training.epochs: set exactly one of them to a positive number "
                f"(got iters={self.iters}, epochs={self.epochs})"
            )
        if self.warmup_steps and self.iters and self.warmup_steps >= self.iters:
            out.append(f"training.warmup_steps: expected fewer than training.iters ({self.iters}), got {self.warmup_steps}")
        return out


@dataclass(frozen=True)
class ValidationConfig(_Section):
    section = "validation"
    every_steps: int = _f(50, "Optimizer steps between validation passes (and the last step).", at_least(1))
    batches: int = _f(-1, "Validation batches per pass; -1 uses the whole validation split.",
                      Check(lambda v: v > 0 or v == -1, "a positive number or -1 for all"))


@dataclass(frozen=True)
class EarlyStoppingConfig(_Section):
    section = "early_stopping"
    patience: int = _f(0, "Validations without an improvement larger than min_delta before stopping; 0 disables.",
                       at_least(0, " (0 disables)"))
    min_delta: float = _f(0.0, "Smallest decrease in validation loss that counts as an improvement.", number(">=", 0))


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    section = "checkpoint"
    every_steps: int = _f(200, "Optimizer steps between full checkpoints.", at_least(1))
    keep_last: int = _f(3, "Newest checkpoints kept by retention (the best is kept besides).",
                        at_least(1, " (the latest is needed to resume)"))
    keep_best: bool = _f(True, "Always keep the checkpoint with the best validation loss.")
    cleanup_after_days: float = _f(30.0, "Cleanup keeps only the adapters, summary and evaluation of runs "
                                         "finished longer ago than this.", number(">=", 0))


_PERCENT = Check(lambda v: 0 < v <= 100, "a percentage in (0, 100]")


@dataclass(frozen=True)
class DiskConfig(_Section):
    section = "disk"
    low_used_percent: float = _f(85.0, "Low watermark: warn and prune to policy above this share used...", _PERCENT)
    low_free: Size = _f(Size(20 * 10**9), "...or below this much free, whichever is stricter.")
    high_used_percent: float = _f(90.0, "High watermark: prune to latest + best above this share used...", _PERCENT)
    high_free: Size = _f(Size(10 * 10**9), "...or below this much free.")
    flood_used_percent: float = _f(95.0, "Flood: write nothing, pause the run, above this share used...", _PERCENT)
    flood_free: Size = _f(Size(5 * 10**9), "...or below this much free (or below the next checkpoint + reserve).")
    reserve: Size = _f(Size(1 * 10**9), "Space always left free for the system, added to every estimate.")
    hysteresis_percent: float = _f(2.0, "Leave a level only when usage falls this many points below it.",
                                   Check(lambda v: 0 <= v < 50, "0 <= value < 50"))
    check_interval_seconds: float = _f(60.0, "Seconds between watermark checks during training.", number(">", 0))

    def cross(self) -> list[str]:
        out = []
        if not self.low_used_percent <= self.high_used_percent <= self.flood_used_percent:
            out.append(
                "disk: expected low_used_percent <= high_used_percent <= flood_used_percent, got "
                f"{self.low_used_percent} / {self.high_used_percent} / {self.flood_used_percent}"
            )
        if not self.low_free >= self.high_free >= self.flood_free:
            out.append(
                "disk: expected low_free >= high_free >= flood_free, got "
                f"{format_size(self.low_free)} / {format_size(self.high_free)} / {format_size(self.flood_free)}"
            )
        return out


@dataclass(frozen=True)
class OverfittingConfig(_Section):
    section = "overfitting"
    excelente_below: float = _f(0.05, "Gap (val - train loss) below this is EXCELENTE.")
    bom_below: float = _f(0.15, "Below this BOM (the seed's target).")
    moderado_below: float = _f(0.30, "Below this MODERADO; at or above it CRÍTICO.")

    def cross(self) -> list[str]:
        if not 0 < self.excelente_below <= self.bom_below <= self.moderado_below:
            return [
                "overfitting: expected 0 < excelente_below <= bom_below <= moderado_below, got "
                f"{self.excelente_below} / {self.bom_below} / {self.moderado_below}"
            ]
        return []


@dataclass(frozen=True)
class EvaluationConfig(_Section):
    section = "evaluation"
    max_new_tokens: int = _f(64, "Tokens generated per test answer (greedy).", at_least(1))
    batch_size: int = _f(8, "Prompts generated together.", at_least(1))
    max_examples: int = _f(0, "Evaluate at most this many test examples; 0 for all.", at_least(0, " (0 for all)"))


_UNIT = Check(lambda v: 0 <= v <= 1, "a number in [0, 1]")


MAX_NAME_LENGTH = 100


def is_plain_name(value: str) -> bool:
    """A name that is one plain path component (a run directory's): no '/', not '.' or '..'."""
    return re.fullmatch(r"[A-Za-z0-9._-]+", value) is not None and value not in (".", "..")


def name_length_problem(key: str, value: str) -> list[str]:
    """A run directory's name must fit any filesystem (NAME_MAX is 255 bytes; temporary siblings add a suffix)."""
    if len(value) > MAX_NAME_LENGTH:
        return [f"{key}: expected at most {MAX_NAME_LENGTH} characters (a directory name), got {len(value)}"]
    return []


@dataclass(frozen=True)
class DecisionConfig(_Section):
    section = "decision"
    max_gap: float = _f(0.15, "A candidate is preferred only if its train/validation gap is below this.",
                        number(">", 0))
    min_f1: float = _f(0.93, "F1 at or above this means ready for production.", _UNIT)
    max_f1_drop: float = _f(0.01, "A candidate may trail the incumbent's F1 by at most this much.", _UNIT)


@dataclass(frozen=True)
class OutputConfig(_Section):
    section = "output"
    runs_dir: str = _f("runs", "Where run directories live (checkpoints, metrics, adapters).")
    production_dir: str = _f("production", "Where releases live; production/current points at one.")
    run_name: str = _f("", "Run directory name (one plain path component); empty uses the config's name.",
                       Check(lambda v: not v or is_plain_name(v),
                             "letters, digits, '.', '_' or '-' (one path component, not '.' or '..')"))

    def cross(self) -> list[str]:
        return name_length_problem("output.run_name", self.run_name)


# An object-store location, `[storage] remote`; farense.run.objectstore.RemoteLocation parses it by this rule.
REMOTE_EXPECTED = ("s3://BUCKET or s3://BUCKET/PREFIX (bucket: 3-63 lowercase letters, digits, '.', '-'; "
                   "prefix: '/'-separated names of letters, digits and !_.*'()=+,@-)")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_KEY_SEGMENT_RE = re.compile(r"^[A-Za-z0-9!_.*'()=+,@-]+$")  # S3's "safe characters" for key names


def is_key_segment(segment: str) -> bool:
    """One '/'-free name of an object key: S3's safe characters, never '.' or '..'."""
    return bool(_KEY_SEGMENT_RE.match(segment)) and segment not in (".", "..")


def split_remote(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/prefix`; ValueError saying which part is wrong."""
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise ValueError("not an s3:// URL")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ValueError(f"bad bucket name {bucket!r}")
    if prefix and not all(is_key_segment(s) for s in prefix.split("/")):
        raise ValueError(f"bad prefix {prefix!r}")
    return bucket, prefix


def _remote_ok(url: str) -> bool:
    try:
        return not url or bool(split_remote(url))
    except ValueError:
        return False


# Short leases are for tests (a takeover in seconds); a real run keeps the default, far above a renewal's time.
MIN_LEASE_SECONDS = 2.0


@dataclass(frozen=True)
class StorageConfig(_Section):
    section = "storage"
    remote: str = _f("", "Object store that is the run's home: s3://BUCKET/PREFIX (checkpoints, best adapters and "
                         "run files mirrored there, resumed from there on any machine, one trainer at a time by a "
                         "lease); empty: local only. Endpoint, region and credentials come only from the "
                         "standard AWS_* environment variables.",
                     Check(_remote_ok, f"'' (local only) or {REMOTE_EXPECTED}"))
    lease_seconds: float = _f(60.0, "The run's lease lasts this long unless renewed (every third of it); a "
                                    "trainer killed without releasing it blocks others this long at most.",
                              number(">=", MIN_LEASE_SECONDS))
    upload_queue: int = _f(2, "Checkpoints waiting for upload at most; a newer one replaces the oldest waiting.",
                           at_least(1))
    drain_seconds: float = _f(120.0, "At the end of a run, a preemption or a full disk: how long to wait for "
                                     "the uploads still queued.", number(">=", 0))


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "lora": LoraConfig,
    "training": TrainingConfig,
    "validation": ValidationConfig,
    "early_stopping": EarlyStoppingConfig,
    "checkpoint": CheckpointConfig,
    "disk": DiskConfig,
    "overfitting": OverfittingConfig,
    "evaluation": EvaluationConfig,
    "decision": DecisionConfig,
    "output": OutputConfig,
    "storage": StorageConfig,
}
TOP_LEVEL_KEYS = ("name", "description", "extends")

# Sections whose fields change what training computes; the fingerprint covers them only.
FINGERPRINT_SECTIONS = ("model", "data", "lora", "training", "validation", "early_stopping")
# How the base computes, not what is trained: the adapters fit the same base values either way, so a
# run may resume on another device (auto picks per device). The prefix cache changes no bit of what is
# trained on the CPU (tests/test_prefix_cache.py), and `auto` keeps it off elsewhere. The LoRA matmuls'
# dtype and the batches' alignment are how a step computes, like model.compute (`auto` picks per
# device, and leaves the CPU's bits as they were; the parameters, the optimizer state and the targets
# counted are the same; tests/test_lora_dtype_align.py): a run may resume on another device, and
# configs written before these keys existed keep their fingerprint.
NOT_FINGERPRINTED = frozenset({"model.compute", "training.prefix_cache", "lora.matmul_dtype",
                               "training.align_tokens"})


@dataclass(frozen=True)
class ExperimentConfig:
    """One resolved experiment: what to train, how, and where its files go."""

    name: str
    description: str
    source: str
    chain: tuple[str, ...]
    model: ModelConfig
    data: DataConfig
    lora: LoraConfig
    training: TrainingConfig
    validation: ValidationConfig
    early_stopping: EarlyStoppingConfig
    checkpoint: CheckpointConfig
    disk: DiskConfig
    overfitting: OverfittingConfig
    evaluation: EvaluationConfig
    decision: DecisionConfig
    output: OutputConfig
    storage: StorageConfig  # where the run lives, not what it trains: outside FINGERPRINT_SECTIONS
    workspace: str = "."
    overlays: tuple[str, ...] = ()  # the overlays applied on top of `source`, in order (--demo, --tiny, ...)

    # ---- derived paths (relative paths resolve against the workspace)

    def resolve(self, value: str) -> Path:
        return self.resolve_in(self.workspace, value)

    @staticmethod
    def resolve_in(workspace: str | os.PathLike[str], value: str) -> Path:
        """`value` as a path: absolute as it is, relative against `workspace`."""
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else Path(workspace) / p

    @property
    def run_name(self) -> str:
        return self.output.run_name or self.name

    @property
    def run_dir(self) -> Path:
        return self.resolve(self.output.runs_dir) / self.run_name

    @property
    def runs_dir(self) -> Path:
        return self.resolve(self.output.runs_dir)

    @property
    def production_dir(self) -> Path:
        return self.resolve(self.output.production_dir)

    @property
    def data_dir(self) -> Path:
        return self.resolve(self.data.dir)

    @property
    def model_is_local(self) -> bool:
        """A path-like value (or an existing directory) is local; anything else is a hub repo id."""
        v = self.model.path
        return (v.startswith((".", "/", "~")) or v.count("/") != 1 or v.lower().endswith(".gguf")
                or self.resolve(v).exists())

    @property
    def model_path(self) -> str:
        return str(self.resolve(self.model.path)) if self.model_is_local else self.model.path

    # ---- serialisation

    def sections(self) -> dict[str, dict[str, Any]]:
        return {name: _section_dict(getattr(self, name)) for name in SECTIONS}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, **self.sections()}

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields that change training, flattened as `section.key`."""
        out = {}
        for sec in FINGERPRINT_SECTIONS:
            for k, v in _section_dict(getattr(self, sec)).items():
                if f"{sec}.{k}" not in NOT_FINGERPRINTED:
                    out[f"{sec}.{k}"] = v
        # Paths enter the fingerprint as written, so moving a workspace does not change it.
        return out

    @property
    def fingerprint(self) -> str:
        """SHA-256 (16 hex) of the training fields; recorded by every run and checkpoint."""
        blob = orjson.dumps(self.fingerprint_fields(), option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(blob).hexdigest()[:16]

    def with_overrides(self, **sections: Mapping[str, Any]) -> "ExperimentConfig":
        """A copy with some fields replaced, validated again (used by tests and overlays)."""
        data = self.to_dict()
        for sec, values in sections.items():
            data[sec] = {**data[sec], **values}
        return build_config(data, source=self.source, chain=self.chain, workspace=self.workspace,
                            overlays=self.overlays)


def _section_dict(obj: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = list(v) if isinstance(v, (list, tuple)) else (int(v) if isinstance(v, Size) else v)
    return out


def field_help(section: str, key: str) -> str:
    for f in dataclasses.fields(SECTIONS[section]):
        if f.name == key:
            return f.metadata.get("help", "")
    return ""


# --------------------------------------------------------------------------- loading


def _did_you_mean(key: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unknown_key(key: str, options: typing.Iterable[str]) -> str:
    options = list(options)
    hint = _did_you_mean(key.rsplit(".", 1)[-1], options)
    return f"{key}: unknown key{hint}" if hint else f"{key}: unknown key; expected one of {', '.join(options)}"


def _type_name(tp: Any) -> str:
    if tp is Size:
        return "a size (bytes, or a string such as '20GB')"
    if tp == AutoInt:
        return "'auto' or an integer"
    if typing.get_origin(tp) in (list, tuple):
        return "a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Check a TOML value against a field type; raise ValueError with what is expected."""
    if tp is Size:
        return Size(parse_size(value))
    if tp == AutoInt:  # the field's Check says which strings and integers
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            return value
        raise ValueError(f"expected 'auto' or an integer, got {type(value).__name__} {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer too large for a float
                raise ValueError(f"expected {_RANGE_EXPECTED[True]}, got {value!r}") from None
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) in (list, tuple):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    raise ValueError(f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def build_config(
    data: Mapping[str, Any],
    *,
    source: str = "<dict>",
    chain: tuple[str, ...] = (),
    workspace: str | os.PathLike = ".",
    origins: Mapping[str, str] | None = None,
    overlays: typing.Sequence[str] = (),
) -> ExperimentConfig:
    """Typed, validated config from a merged mapping; every problem is reported at once.

    `origins` maps `section.key` to the file that set it, so that a bad value inherited from a
    parent or an overlay is reported against that file too.
    """
    problems: list[str] = []
    known = [*SECTIONS, *TOP_LEVEL_KEYS]
    for key in data:
        if key not in known:
            problems.append(_unknown_key(key, known))
    built: dict[str, Any] = {}
    for sec, cls in SECTIONS.items():
        raw = data.get(sec, {})
        if not isinstance(raw, Mapping):
            problems.append(f"{sec}: expected a table [{sec}], got {type(raw).__name__}")
            raw = {}
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in raw.items():
            if key not in hints:
                problems.append(_unknown_key(f"{sec}.{key}", names))
                continue
            try:
                kwargs[key] = _coerce(value, hints[key])
            except ValueError as e:
                problems.append(f"{sec}.{key}: {e}")
        obj = cls(**kwargs)
        problems.extend(obj.problems())
        built[sec] = obj
    name = data.get("name", "")
    if not isinstance(name, str) or not (not name or is_plain_name(name)):
        problems.append(f"name: expected letters, digits, '.', '_' or '-' (not '.' or '..'), got {name!r}")
    elif isinstance(name, str):
        problems.extend(name_length_problem("name", name))
    if not problems:
        problems.extend(_cross_problems(built))
    if problems:
        raise ConfigError([_with_origin(p, origins, source) for p in problems], source=source)
    return ExperimentConfig(
        name=name or Path(source).stem,
        description=str(data.get("description", "")),
        source=source,
        chain=chain,
        workspace=str(workspace),
        overlays=tuple(overlays),
        **built,
    )


def _with_origin(problem: str, origins: Mapping[str, str] | None, source: str) -> str:
    key = problem.split(":", 1)[0]
    where = (origins or {}).get(key)
    if where and Path(where).resolve() != Path(source).resolve():
        return f"{problem} [set in {where}]"
    return problem


def _origins_of(data: Mapping[str, Any], path: Path) -> dict[str, str]:
    out = {}
    for k, v in data.items():
        for kk in v if isinstance(v, Mapping) else ():
            out[f"{k}.{kk}"] = str(path)
        out[k] = str(path)
    return out


def _cross_problems(s: dict[str, Any]) -> list[str]:
    out = []
    t, ck, v = s["training"], s["checkpoint"], s["validation"]
    if t.iters and ck.every_steps > t.iters:
        out.append(
            f"checkpoint.every_steps: {ck.every_steps} is more than training.iters ({t.iters}); "
            "no checkpoint would be written before the end"
        )
    if t.iters and v.every_steps > t.iters:
        out.append(f"validation.every_steps: {v.every_steps} is more than training.iters ({t.iters})")
    return out


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


_BOM = b"\xef\xbb\xbf"


def _read_toml(path: Path) -> dict[str, Any]:
    """The file's TOML; what keeps it from being read (missing, a directory, not UTF-8, a BOM) is named."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"file not found: {path}", source=str(path)) from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory; expected a TOML config file", source=str(path)) from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}", source=str(path)) from None
    if raw.startswith(_BOM):
        raise ConfigError("the file starts with a UTF-8 byte-order mark (BOM); save it without one",
                          source=str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"not UTF-8 text (invalid byte 0x{raw[e.start]:02x} on line {line}); TOML files are "
                          "UTF-8", source=str(path)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"TOML syntax error: {e}", source=str(path)) from None


def _resolved(path: Path) -> Path:
    """The absolute path, or a ConfigError for a symlink loop (resolve raises RuntimeError for it in 3.11)."""
    try:
        return path.resolve(strict=path.is_symlink())
    except FileNotFoundError:
        raise ConfigError(f"file not found: {path} (a symbolic link to a missing file)", source=str(path)) from None
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"cannot follow {path}: {getattr(e, 'strerror', None) or e}", source=str(path)) from None


def _load_merged(
    path: Path, seen: tuple[Path, ...]
) -> tuple[dict[str, Any], tuple[str, ...], dict[str, str]]:
    """The merged mapping of a file and its parents, the files in order, and who set each key."""
    path = _resolved(path)
    if path in seen:
        cycle = " -> ".join(p.name for p in (*seen, path))
        raise ConfigError(f"extends: circular inheritance ({cycle})", source=str(path))
    data = _read_toml(path)
    parents = data.pop("extends", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"extends: expected a file name or a list of them, got {parents!r}", source=str(path))
    merged: dict[str, Any] = {}
    chain: tuple[str, ...] = ()
    origins: dict[str, str] = {}
    for parent in parents:
        ppath = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
        if not ppath.suffix and ppath.name:  # "/" has no name to add a suffix to
            ppath = ppath.with_suffix(".toml")
        if not ppath.exists():
            raise ConfigError(f"extends: parent config {parent!r} not found (looked for {ppath})", source=str(path))
        pdata, pchain, porigins = _load_merged(ppath, (*seen, path))
        merged = _deep_merge(merged, pdata)
        chain += pchain
        origins |= porigins
    merged.pop("name", None)  # a child is named by its own file unless it says otherwise
    merged = _deep_merge(merged, data)
    return merged, (*chain, str(path)), origins | _origins_of(data, path)


def default_config_dir() -> Path:
    """configs/ of the workspace if it has one, else the one in this source checkout."""
    env = os.environ.get("FARENSE_CONFIG_DIR")
    if env:
        return Path(env)
    local = Path.cwd() / "configs"
    if local.is_dir():
        return local
    return Path(__file__).resolve().parent.parent / "configs"


def find_config(name_or_path: str, config_dir: Path | None = None) -> Path:
    """`v2` -> configs/v2.toml; a path is taken as it is."""
    p = Path(name_or_path)
    if p.suffix in (".toml", ".json") or p.is_file() or os.sep in name_or_path:
        return p
    d = config_dir or default_config_dir()
    cand = d / f"{name_or_path}.toml"
    if cand.exists():
        return cand
    known = sorted(x.stem for x in d.glob("*.toml")) if d.is_dir() else []
    hint = _did_you_mean(name_or_path, known)
    raise ConfigError(
        f"no config named {name_or_path!r} in {d}{hint}; known: {', '.join(known) or 'none'}", source=str(cand)
    )


def find_overlay(name_or_path: str, config_dir: Path | None = None) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.is_file():
        return p
    d = (config_dir or default_config_dir()) / "overlays"
    cand = d / f"{name_or_path}.toml"
    if not cand.exists():
        known = sorted(x.stem for x in d.glob("*.toml")) if d.is_dir() else []
        raise ConfigError(f"no overlay named {name_or_path!r} in {d}; known: {', '.join(known) or 'none'}", source=str(cand))
    return cand


def load_config(
    name_or_path: str | os.PathLike,
    *,
    overlays: typing.Sequence[str] = (),
    workspace: str | os.PathLike | None = None,
    config_dir: Path | None = None,
) -> ExperimentConfig:
    """Read, merge (extends, then overlays) and validate a config; cheap, imports nothing heavy.

    A `.json` path is a config resolved earlier (a run's config.json): it already records its
    overlays and workspace, so the trainer trains from exactly what the flow checked.
    """
    path = find_config(str(name_or_path), config_dir)
    if path.suffix == ".json":
        if overlays:
            raise ConfigError(f"a resolved config already records its overlays ({', '.join(overlays)} given again)",
                              source=str(path))
        return config_from_json(path, workspace=workspace)
    merged, chain, origins = _load_merged(path, ())
    merged.setdefault("name", path.stem)
    for ov in overlays:
        opath = find_overlay(ov, config_dir)
        odata, ochain, oorigins = _load_merged(opath, ())
        odata.pop("name", None)
        merged = _deep_merge(merged, odata)
        chain += ochain
        origins |= oorigins
    ws = Path(workspace) if workspace is not None else current_workspace()
    return build_config(merged, source=str(path), chain=chain, workspace=ws.resolve(), origins=origins,
                        overlays=overlays)


def current_workspace() -> Path:
    """The workspace this command works in: `farense --workspace` (FARENSE_WORKSPACE), else the current directory."""
    return Path(os.environ.get("FARENSE_WORKSPACE") or Path.cwd()).resolve()


def config_from_json(path: Path, *, workspace: str | os.PathLike | None = None) -> ExperimentConfig:
    """The config a run recorded in its config.json (a ConfigError naming the file when it is not one)."""
    try:
        data = orjson.loads(Path(path).read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON ({exc}); a run's config.json is written by farense train",
                          source=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"expected a JSON object (the run's resolved config), got {type(data).__name__}",
                          source=str(path))
    meta = data.pop("_meta", {})
    meta = meta if isinstance(meta, dict) else {}
    ws = workspace if workspace is not None else str(meta.get("workspace", "."))
    chain = meta.get("chain")
    chain = tuple(str(c) for c in chain) if isinstance(chain, list) else ()
    overlays = meta.get("overlays")
    overlays = tuple(str(o) for o in overlays) if isinstance(overlays, list) else ()
    return build_config(data, source=str(meta.get("source", path)), chain=chain, workspace=ws, overlays=overlays)


def config_to_json(config: ExperimentConfig) -> bytes:
    payload = config.to_dict()
    payload["_meta"] = {
        "source": config.source,
        "chain": list(config.chain),
        "overlays": list(config.overlays),
        "workspace": config.workspace,
        "fingerprint": config.fingerprint,
    }
    return orjson.dumps(payload, option=orjson.OPT_INDENT_2)


def config_to_toml(config: ExperimentConfig) -> str:
    import tomli_w

    return tomli_w.dumps(config.to_dict())


def flatten(config: ExperimentConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"name": config.name, "description": config.description}
    for sec, values in config.sections().items():
        for k, v in values.items():
            out[f"{sec}.{k}"] = v
    return out


def diff_configs(a: ExperimentConfig, b: ExperimentConfig) -> list[tuple[str, Any, Any]]:
    """Every field whose value differs, as (dotted key, a's value, b's value)."""
    fa, fb = flatten(a), flatten(b)
    return [(k, fa.get(k), fb.get(k)) for k in fa if fa.get(k) != fb.get(k)]


def fingerprint_diff(recorded: Mapping[str, Any], config: ExperimentConfig) -> list[tuple[str, Any, Any]]:
    """Training fields that differ between a checkpoint's recorded fields and a config."""
    now = config.fingerprint_fields()
    keys = sorted(set(recorded) | set(now))
    return [(k, recorded.get(k), now.get(k)) for k in keys if recorded.get(k) != now.get(k)]


__all__ = [
    "ExperimentConfig",
    "ModelConfig",
    "DataConfig",
    "LoraConfig",
    "TrainingConfig",
    "ValidationConfig",
    "EarlyStoppingConfig",
    "CheckpointConfig",
    "DiskConfig",
    "OverfittingConfig",
    "EvaluationConfig",
    "DecisionConfig",
    "OutputConfig",
    "StorageConfig",
    "load_config",
    "build_config",
    "diff_configs",
    "fingerprint_diff",
    "parse_size",
    "format_size",
    "check_world_size",
    "COMPUTE_MODES",
]



def check_world_size(config: ExperimentConfig, world_size: int) -> None:
    """Refuse a distributed run whose ranks cannot share each micro-batch equally."""
    if world_size < 1:
        raise ConfigError(f"world size: expected an integer >= 1, got {world_size}", source=config.source)
    bs = config.training.batch_size
    if bs % world_size:
        raise ConfigError(
            f"training.batch_size: {bs} examples cannot be split equally across {world_size} ranks; "
            f"expected a multiple of {world_size}",
            source=config.source,
        )
