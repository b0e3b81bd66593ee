"""The experiment's input checks, in one place: everything that can be wrong is found before anything heavy.

The trainer, the Prefect check task and the `farense` commands all call `check_experiment`; a
config that passes here fails later only for reasons no check could foresee (a full disk, a kill).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from farense.config import ExperimentConfig, check_world_size, config_to_json
from farense.disk.preflight import check_writable
from farense.errors import ConfigError
from farense.model.gguf import gguf_problems
from farense.run.fsutil import atomic_write_bytes
from farense.run.layout import RunPaths
from farense.run.runstate import run_placement_problem
from farense.train.data import DataReport, validate_data


@dataclass(frozen=True)
class CheckedExperiment:
    """What the checks read on the way: the data report and the loaded splits (so nothing is read twice)."""

    config: ExperimentConfig
    report: DataReport
    loaded: dict[str, list[dict]] = field(repr=False)


def check_experiment(config: ExperimentConfig, *, world_size: int = 1, probe_writes: bool = True,
                     require_test: bool = False) -> CheckedExperiment:
    """Model path (GGUF header, layer count), data files and their rows, where the run goes, the world
    size and (with `probe_writes`) a real write in every output directory; one error names each problem."""
    check_inputs(config)
    report, loaded = validate_data(config, require_test=require_test)
    check_world_size(config, world_size)
    if probe_writes:
        check_writable(config)  # a read-only checkpoints directory fails now, not at the first checkpoint
    return CheckedExperiment(config, report, loaded)


def write_resolved_config(config: ExperimentConfig) -> Path:
    """The resolved config (overlays applied, workspace fixed) into the run directory, atomically: the
    trainer child trains from exactly this file, so a config edited meanwhile changes nothing."""
    path = RunPaths(config.run_dir).resolved_config
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, config_to_json(config))
    return path


def check_model_path(config: ExperimentConfig) -> list[str]:
    """Problems with the model location, found without loading anything."""
    if config.model_is_local:
        p = Path(config.model_path)
        if p.suffix.lower() == ".gguf":
            return _gguf_problems(config, p)
        if not p.is_dir():
            return [f"model.path: model directory not found: {p} (for the demo model run `farense demo init`)"]
        if not (p / "config.json").exists():
            return [f"model.path: {p} has no config.json (expected a Hugging Face layout model directory)"]
        if not any(p.glob("*.safetensors")):
            return [f"model.path: {p} has no *.safetensors weights"]
        return _layer_count_problems(config, p / "config.json")
    return _hub_model_problems(config)


def _gguf_problems(config: ExperimentConfig, p: Path) -> list[str]:
    """A .gguf model.path: the file's header is read (no weights) for its architecture, types and layers."""
    if not p.is_file():
        return [f"model.path: GGUF file not found: {p}"]
    return gguf_problems(p, config.lora.num_layers)


def _layer_count_problems(config: ExperimentConfig, model_config: Path) -> list[str]:
    """lora.num_layers against the model's layer count, read from its config.json (no weights)."""
    try:
        layers = orjson.loads(model_config.read_bytes()).get("num_hidden_layers")
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return [f"model.path: {model_config} is not a readable JSON object"]
    if isinstance(layers, int) and config.lora.num_layers > layers:
        return [f"lora.num_layers: requested to train {config.lora.num_layers} layers but the model only has "
                f"{layers} layers (expected 1..{layers}, or -1 for all)"]
    return []


def _hub_model_problems(config: ExperimentConfig) -> list[str]:
    """A hub model can only be used offline if it is already in the Hugging Face cache."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(config.model.path, "config.json")
        except Exception:  # a hub library problem is not the user's config error
            cached = None
        if not isinstance(cached, str):
            return [
                f"model.path: {config.model.path!r} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 "
                "forbids downloading it"
            ]
    return []



def check_inputs(config: ExperimentConfig) -> None:
    """Fail before any heavy work if the model or the data files are missing, or the run would nest in another."""
    problems = check_model_path(config)
    d = config.data_dir
    if not d.is_dir():
        problems.append(f"data.dir: directory not found: {d} (expected train.jsonl, valid.jsonl, test.jsonl)")
    else:
        for split in ("train", "valid"):
            if not (d / f"{split}.jsonl").exists():
                problems.append(f"data.dir: {d / (split + '.jsonl')} not found (the {split} split is required)")
    if (placement := run_placement_problem(config.run_dir, workspace=config.workspace)) is not None:
        problems.append(f"output.run_name: {placement}")
    if problems:
        raise ConfigError(problems, source=config.source)
