"""Training data: validation of the JSONL splits before anything heavy, then mlx-lm datasets.

The formats are mlx-lm's (chat `messages`, `prompt`/`completion`, `text`); problems are reported
with file:line so a person can open the file at the right place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import orjson

from farense.config import DataConfig, ExperimentConfig
from farense.errors import ConfigError, DataError

SPLITS = ("train", "valid", "test")
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class SplitReport:
    name: str
    path: Path
    examples: int
    format: str | None
    too_long: int = 0
    longest: int = 0


@dataclass(frozen=True)
class DataReport:
    splits: dict[str, SplitReport] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def _example_format(obj: Any, cfg: DataConfig) -> str | None:
    if not isinstance(obj, dict):
        return None
    if cfg.prompt_feature in obj and cfg.completion_feature in obj:
        return "completions"
    if cfg.chat_feature in obj:
        return "chat"
    if cfg.text_feature in obj:
        return "text"
    return None


def _check_example(obj: dict, fmt: str, cfg: DataConfig) -> str | None:
    """What is wrong with one example, or None."""
    if fmt == "chat":
        msgs = obj[cfg.chat_feature]
        if not isinstance(msgs, list) or not msgs:
            return f"'{cfg.chat_feature}' must be a non-empty list of {{role, content}} objects"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                return f"'{cfg.chat_feature}[{i}]' must have 'role' and 'content'"
            if m["role"] not in ROLES:
                return f"'{cfg.chat_feature}[{i}].role' must be one of {', '.join(ROLES)}, got {m['role']!r}"
            if not isinstance(m["content"], str):
                return f"'{cfg.chat_feature}[{i}].content' must be a string"
        if msgs[-1]["role"] != "assistant":
            return f"the last message must be the assistant's answer, got role {msgs[-1]['role']!r}"
    elif fmt == "completions":
        for k in (cfg.prompt_feature, cfg.completion_feature):
            if not isinstance(obj[k], str) or not obj[k].strip():
                return f"'{k}' must be a non-empty string"
    elif fmt == "text":
        if not isinstance(obj[cfg.text_feature], str) or not obj[cfg.text_feature].strip():
            return f"'{cfg.text_feature}' must be a non-empty string"
    return None


def read_split(path: Path, cfg: DataConfig, problems: list[str]) -> tuple[list[dict], str | None]:
    """Parse one JSONL split, appending file:line problems; returns the examples and their format."""
    examples: list[dict] = []
    fmt: str | None = None
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                problems.append(f"{path}:{lineno}: malformed JSON ({e})")
                continue
            this = _example_format(obj, cfg)
            if this is None:
                keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                problems.append(
                    f"{path}:{lineno}: missing fields: expected '{cfg.chat_feature}', "
                    f"'{cfg.prompt_feature}'+'{cfg.completion_feature}' or '{cfg.text_feature}', got {keys}"
                )
                continue
            if fmt is None:
                fmt = this
            elif this != fmt:
                problems.append(f"{path}:{lineno}: format {this!r} differs from the file's first example ({fmt!r})")
                continue
            bad = _check_example(obj, this, cfg)
            if bad:
                problems.append(f"{path}:{lineno}: {bad}")
                continue
            examples.append(obj)
    return examples, fmt


def validate_data(config: ExperimentConfig, *, require_test: bool = False) -> tuple[DataReport, dict[str, list[dict]]]:
    """Structural validation of every split (no tokenizer): raises DataError listing file:line problems."""
    d = config.data_dir
    if not d.is_dir():
        raise ConfigError(f"data.dir: directory not found: {d} (expected train.jsonl, valid.jsonl, test.jsonl)",
                          source=config.source)
    problems: list[str] = []
    reports: dict[str, SplitReport] = {}
    loaded: dict[str, list[dict]] = {}
    required = ("train", "valid", "test") if require_test else ("train", "valid")
    for split in SPLITS:
        path = d / f"{split}.jsonl"
        if not path.exists():
            if split in required:
                problems.append(f"{path}: file not found (the {split} split is required)")
            continue
        examples, fmt = read_split(path, config.data, problems)
        if not examples and split in required:
            problems.append(f"{path}: the {split} split is empty (expected at least one valid example)")
        reports[split] = SplitReport(split, path, len(examples), fmt)
        loaded[split] = examples
    fmts = {r.format for r in reports.values() if r.format}
    if len(fmts) > 1:
        problems.append(f"{d}: splits use different formats ({', '.join(sorted(fmts))})")
    train = reports.get("train")
    t = config.training
    if train and train.examples and train.examples < t.batch_size:
        problems.append(
            f"{train.path}: {train.examples} examples cannot fill one batch of training.batch_size={t.batch_size}; "
            f"expected at least {t.batch_size} examples (or a smaller batch_size)"
        )
    valid = reports.get("valid")
    if valid and valid.examples and valid.examples < t.batch_size:
        problems.append(
            f"{valid.path}: {valid.examples} examples cannot fill one validation batch of "
            f"training.batch_size={t.batch_size}; expected at least {t.batch_size} examples (or a smaller batch_size)"
        )
    if problems:
        raise DataError(problems)
    return DataReport(reports), loaded


def count_too_long(dataset: Any, max_seq_length: int) -> tuple[int, int]:
    """How many tokenized examples exceed max_seq_length, and the longest length."""
    too_long = longest = 0
    for i in range(len(dataset)):
        n = len(dataset[i][0])
        longest = max(longest, n)
        too_long += n > max_seq_length
    return too_long, longest


def make_datasets(
    config: ExperimentConfig, tokenizer: Any, loaded: dict[str, list[dict]], splits: Sequence[str] = ("train", "valid")
) -> dict[str, Any]:
    """mlx-lm datasets (tokenized lazily and cached) for the given splits."""
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset

    class _Args:  # create_dataset reads these attributes
        mask_prompt = config.training.mask_prompt
        prompt_feature = config.data.prompt_feature
        completion_feature = config.data.completion_feature
        chat_feature = config.data.chat_feature
        text_feature = config.data.text_feature

    return {s: CacheDataset(create_dataset(loaded[s], tokenizer, _Args)) for s in splits if loaded.get(s)}


def data_fingerprint(config: ExperimentConfig) -> str:
    """SHA-256 (16 hex) of the train and valid files' bytes: resuming on changed data is refused."""
    import hashlib

    h = hashlib.sha256()
    for split in ("train", "valid"):
        p = config.data_dir / f"{split}.jsonl"
        if p.exists():
            h.update(split.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]
