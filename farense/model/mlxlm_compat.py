"""mlx-lm compatibility: import an `mlx_lm.lora` YAML config; export adapters or a fused model.

People arrive with a `lora_config.yaml` that `mlx_lm.lora -c` trains, and leave wanting files that
`mlx_lm.generate --adapter-path` and `mlx_lm.fuse` read. The run's adapters/ already has mlx-lm's
layout (farense.train.setup.adapter_config); this module covers the two other directions.

Import maps every key mlx-lm documents (mlx_lm/lora.py: CONFIG_DEFAULTS and its argument parser;
LORA.md: the data feature keys and hf_dataset) as KEY_RULES says, or refuses it with the reason;
a key mlx-lm does not know is refused with a did-you-mean. A key the YAML leaves out takes
mlx-lm's default, not farense's, so the imported config trains what `mlx_lm.lora -c` would.
Two differences of units are converted, not copied:

- mlx-lm counts `iters`, `steps_per_eval` and `save_every` in micro-batches (an optimizer update
  every `grad_accumulation_steps` of them); farense counts optimizer steps. The importer divides.
- mlx-lm's AdamW defaults to weight_decay 0.01 (mlx's default); farense writes it explicitly.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import orjson

from farense.config import build_config, config_from_json
from farense.errors import ConfigError, FarenseError
from farense.model.gguf import resolve_model_path
from farense.run.fsutil import commit_dir, sha256_file, staged_dir
from farense.run.layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTERS_FILE,
    BEST_RECORD_FILE,
    RunPaths,
)

# mlx_lm/lora.py CONFIG_DEFAULTS (mlx-lm 0.32); a test checks this copy against the installed one,
# so that importing a config does not import mlx.
MLX_LM_DEFAULTS: dict[str, Any] = {
    "model": "Qwen/Qwen3-0.6b",
    "train": False,
    "fine_tune_type": "lora",
    "optimizer": "adam",
    "optimizer_config": {"adam": {}, "adamw": {}, "muon": {}, "sgd": {}, "adafactor": {}},
    "data": "mlx-community/WikiSQL",
    "seed": 0,
    "num_layers": 16,
    "batch_size": 4,
    "iters": 1000,
    "val_batches": 25,
    "learning_rate": 1e-5,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "resume_adapter_file": None,
    "adapter_path": "adapters",
    "save_every": 100,
    "test": False,
    "test_batches": 500,
    "max_seq_length": 2048,
    "config": None,
    "grad_checkpoint": False,
    "grad_accumulation_steps": 1,
    "clear_cache_threshold": 0,
    "lr_schedule": None,
    "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
    "mask_prompt": False,
    "report_to": None,
    "project_name": None,
    "trust_remote_code": False,
}

# What becomes of each key mlx-lm documents. "->" maps it; "ignored" accepts it with a note when set;
# "refused" stops the import with the reason.
KEY_RULES: dict[str, str] = {
    "model": "-> model.path (as written; a relative path resolves against the farense workspace)",
    "data": "-> data.dir (required: a local directory with train.jsonl / valid.jsonl; Hugging Face dataset "
            "names are not read)",
    "hf_dataset": "refused: farense trains on local JSONL files it validates before training",
    "chat_feature": "-> data.chat_feature",
    "prompt_feature": "-> data.prompt_feature",
    "completion_feature": "-> data.completion_feature",
    "text_feature": "-> data.text_feature",
    "trust_remote_code": "-> model.trust_remote_code",
    "fine_tune_type": "lora | dora -> lora.type; full refused (farense trains and checkpoints adapters only)",
    "num_layers": "-> lora.num_layers (-1: all)",
    "lora_parameters": "rank, scale, dropout, keys -> lora.rank, lora.scale, lora.dropout, lora.keys",
    "batch_size": "-> training.batch_size",
    "grad_accumulation_steps": "-> training.grad_accumulation",
    "iters": "micro-batches -> training.iters = iters // grad_accumulation_steps (optimizer steps)",
    "learning_rate": "-> training.learning_rate (constant) when there is no lr_schedule; ignored by mlx-lm otherwise",
    "lr_schedule": "cosine_decay | linear_schedule -> training.schedule, learning_rate, min_learning_rate, "
                   "warmup_steps; other schedules refused",
    "optimizer": "adam | adamw -> training.optimizer; muon, sgd, adafactor refused",
    "optimizer_config": "the chosen optimizer's weight_decay -> training.weight_decay; other settings "
                        "accepted only at mlx's defaults",
    "max_seq_length": "-> training.max_seq_length",
    "seed": "-> training.seed",
    "grad_checkpoint": "-> training.grad_checkpoint",
    "mask_prompt": "-> training.mask_prompt",
    "steps_per_eval": "micro-batches -> validation.every_steps (optimizer steps)",
    "val_batches": "-> validation.batches",
    "save_every": "micro-batches -> checkpoint.every_steps (full, resumable checkpoints)",
    "adapter_path": "ignored: the best adapters go to <runs_dir>/<name>/adapters, in mlx-lm's layout",
    "resume_adapter_file": "refused when set: farense resumes from its own checkpoints (optimizer, RNG, data "
                           "position), not from bare adapter weights",
    "steps_per_report": "ignored: farense records every step in metrics.jsonl",
    "report_to": "refused when set: farense does not report to wandb/swanlab (metrics.jsonl, `farense monitor`, "
                 "Prefect artifacts)",
    "project_name": "ignored (belongs to report_to)",
    "train": "ignored: `farense train` trains",
    "test": "ignored: `farense evaluate RUN` tests (loss, perplexity, F1) after training",
    "test_batches": "ignored: see evaluation.max_examples",
    "clear_cache_threshold": "ignored: allocator housekeeping, no effect on what is trained",
    "config": "ignored (the -c option itself)",
    # Newer mlx-lm versions (examples/lora_config.yaml) and older ones document these too.
    "training_mode": "normal: accepted (what farense trains); grpo and other modes refused",
    "wandb": "refused when set: mlx-lm's older name for report_to; farense does not report to wandb",
    **{k: "ignored unless training_mode is grpo (a GRPO setting)" for k in (
        "reference_model_path", "group_size", "beta", "epsilon", "max_completion_length", "use_chat_template",
        "use_prompt", "temperature", "reward_weights", "answer_feature", "system_feature")},
}
GRPO_KEYS = tuple(k for k, rule in KEY_RULES.items() if "a GRPO setting" in rule)

_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "data": (str,), "chat_feature": (str,), "prompt_feature": (str,),
    "completion_feature": (str,), "text_feature": (str,), "trust_remote_code": (bool,),
    "fine_tune_type": (str,), "num_layers": (int,), "lora_parameters": (dict,), "batch_size": (int,),
    "grad_accumulation_steps": (int,), "iters": (int,), "learning_rate": (float, int), "lr_schedule": (dict,),
    "optimizer": (str,), "optimizer_config": (dict,), "max_seq_length": (int,), "seed": (int,),
    "grad_checkpoint": (bool,), "mask_prompt": (bool,), "steps_per_eval": (int,), "val_batches": (int,),
    "save_every": (int,), "adapter_path": (str,), "resume_adapter_file": (str,), "steps_per_report": (int,),
    "report_to": (str,), "project_name": (str,), "train": (bool,), "test": (bool,), "test_batches": (int,),
    "clear_cache_threshold": (int, str), "config": (str,), "hf_dataset": (dict, list),
    "training_mode": (str,), "wandb": (str,), "reference_model_path": (str,), "group_size": (int,),
    "beta": (float, int), "epsilon": (float, int), "max_completion_length": (int,), "use_chat_template": (bool,),
    "use_prompt": (bool,), "temperature": (float, int), "reward_weights": (list,), "answer_feature": (str,),
    "system_feature": (str,),
}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a mapping",
               list: "a list"}
FEATURE_KEYS = ("chat_feature", "prompt_feature", "completion_feature", "text_feature")
LORA_PARAMETER_KEYS = ("rank", "scale", "dropout", "keys")
SCHEDULE_KEYS = ("name", "arguments", "warmup", "warmup_init")
OPTIMIZERS = ("adam", "adamw", "muon", "sgd", "adafactor")
# mlx.optimizers.Adam/AdamW defaults: farense builds its optimizers with these.
ADAM_DEFAULTS: dict[str, Any] = {"betas": [0.9, 0.999], "eps": 1e-8, "bias_correction": False}
ADAMW_WEIGHT_DECAY = 0.01


def yaml_loader() -> type:
    """A SafeLoader that reads 1e-5 as a float, as mlx-lm's does (YAML 1.1 reads it as a string).

    A subclass, so the global yaml.SafeLoader is left alone (mlx_lm.lora patches it in place).
    """
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:
             [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+][0-9]+)?
            |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    )
    return Loader


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The YAML mapping of an mlx-lm config file; ConfigError naming the file when it is not one."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"file not found: {path}", source=str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (invalid byte at offset {e.start}); mlx-lm configs are UTF-8 YAML",
                          source=str(path)) from None
    except OSError as e:  # a directory, a symlink loop, no permission
        raise ConfigError(f"cannot read {path}: {e.strerror or e}", source=str(path)) from None
    try:
        doc = yaml.load(text, Loader=yaml_loader())
    except yaml.YAMLError as e:
        raise ConfigError(f"YAML syntax error: {e}", source=str(path)) from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"expected a mapping of mlx-lm lora options, got {type(doc).__name__}", source=str(path))
    return doc


@dataclass
class ImportedConfig:
    """A farense config built from an mlx-lm one, and what the import decided on the way."""

    name: str
    source: str
    data: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_toml(self) -> str:
        """The config as TOML, with the notes as comments at the top."""
        import tomli_w

        head = [f"# Imported from mlx-lm config {self.source} by `farense config import`.",
                "# mlx-lm counts iters/steps_per_eval/save_every in micro-batches; these values are optimizer steps."]
        head += [f"# note: {n}" for n in self.notes]
        return "\n".join(head) + "\n\n" + tomli_w.dumps(self.data)


def _did_you_mean(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unknown_key(key: str, known: list[str]) -> str:
    if key in LORA_PARAMETER_KEYS or key.startswith("lora_") or key == "alpha":
        return (f"{key}: not an mlx-lm lora option; LoRA settings go under lora_parameters "
                f"({', '.join(LORA_PARAMETER_KEYS)})")
    hint = _did_you_mean(key, known)
    if hint:
        return f"{key}: not an mlx-lm lora option{hint}"
    return f"{key}: not an mlx-lm lora option; mlx-lm documents: {', '.join(known)}"


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _steps(micro: int, accum: int, total: int, key: str, target: str, notes: list[str]) -> int:
    """An interval in micro-batches as optimizer steps, within 1..total."""
    steps = max(1, round(micro / accum))
    if micro % accum:
        notes.append(f"{key}: {micro} micro-batches is not a whole number of optimizer steps of {accum}; "
                     f"{target} = {steps}")
    if steps > total:
        notes.append(f"{key}: {steps} optimizer steps is more than the run's {total}; {target} = {total} "
                     "(mlx-lm also acts at the last iteration)")
        steps = total
    return steps


def import_lora_config(raw: Mapping[str, Any], *, name: str, source: str = "<mlx-lm config>") -> ImportedConfig:
    """Translate an mlx-lm lora config mapping into farense's; every problem is reported at once."""
    problems: list[str] = []
    notes: list[str] = []
    raw = _usable_keys(raw, problems)  # the rest is still mapped, so that every problem is reported at once
    # mlx-lm fills a key that is missing, or set to null, with its default.
    v = {k: (raw[k] if raw.get(k) is not None else d) for k, d in MLX_LM_DEFAULTS.items()}
    _refused_keys(raw, problems)

    model = {"path": v["model"], "quantize_bits": 0, "trust_remote_code": bool(v["trust_remote_code"])}
    data: dict[str, Any] = {"dir": v["data"], **{k: raw[k] for k in FEATURE_KEYS if raw.get(k) is not None}}
    lora = _map_lora(v, problems)
    training, total = _map_training(v, problems, notes)
    _map_schedule(raw, v, training, total, problems, notes)
    _map_optimizer(raw, v, training, problems, notes)

    # Validation and checkpoints, in optimizer steps.
    accum = v["grad_accumulation_steps"]
    validation: dict[str, Any] = {"batches": v["val_batches"]}
    checkpoint: dict[str, Any] = {}
    if total >= 1:
        validation["every_steps"] = _steps(v["steps_per_eval"], accum, total, "steps_per_eval",
                                           "validation.every_steps", notes)
        checkpoint["every_steps"] = _steps(v["save_every"], accum, total, "save_every", "checkpoint.every_steps",
                                           notes)
    # Accepted, without effect.
    for key in ("adapter_path", "steps_per_report", "project_name", "train", "test", "test_batches",
                "clear_cache_threshold", "config", *GRPO_KEYS):
        if raw.get(key) is not None:
            notes.append(f"{key}: {KEY_RULES[key]}")

    if problems:
        raise ConfigError(problems, source=source)
    doc = {
        "name": name,
        "description": f"imported from mlx-lm config {Path(source).name}",
        "model": model,
        "data": data,
        "lora": lora,
        "training": training,
        "validation": validation,
        "early_stopping": {"patience": 0, "min_delta": 0.0},  # mlx-lm has none
        "checkpoint": checkpoint,
    }
    try:
        build_config(doc, source=source)
    except ConfigError as e:  # values mlx-lm would take but farense refuses (e.g. rank 0)
        raise ConfigError([f"{p} (after mapping the mlx-lm keys)" for p in e.problems], source=source) from None
    return ImportedConfig(name=name, source=source, data=doc, notes=notes)


def _usable_keys(raw: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """The keys mlx-lm knows with values of the types it takes; unknown keys and wrong types are problems."""
    known = sorted(KEY_RULES)
    usable: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in KEY_RULES:
            problems.append(_unknown_key(str(key), known))
        elif key in _TYPES and value is not None and not _type_ok(value, _TYPES[key]):
            want = " or ".join(_TYPE_NAMES[t] for t in _TYPES[key] if t is not int or float not in _TYPES[key])
            problems.append(f"{key}: expected {want}, got {type(value).__name__} {value!r}")
        else:
            usable[key] = value
    return usable


def _refused_keys(raw: Mapping[str, Any], problems: list[str]) -> None:
    """Keys whose meaning farense does not provide: refused outright, each saying what to do instead."""
    if raw.get("data") is None:
        problems.append("data: missing; mlx-lm's default is the Hugging Face dataset "
                        f"{MLX_LM_DEFAULTS['data']!r}, and farense trains on a local directory with train.jsonl "
                        "and valid.jsonl: set data to it")
    if raw.get("hf_dataset") is not None:
        problems.append("hf_dataset: " + KEY_RULES["hf_dataset"] + "; export the dataset to train.jsonl / "
                        "valid.jsonl / test.jsonl and set data to that directory")
    if raw.get("resume_adapter_file") is not None:
        problems.append("resume_adapter_file: " + KEY_RULES["resume_adapter_file"].split(": ", 1)[1]
                        + "; remove it (a stopped farense run resumes by itself)")
    for key in ("report_to", "wandb"):
        if raw.get(key) is not None:
            problems.append(f"{key}: " + KEY_RULES[key].split(": ", 1)[1] + f" (got {raw[key]!r}); remove it")
    mode = raw.get("training_mode")
    if mode is not None and mode != "normal":
        problems.append(f"training_mode: {mode!r} is not supported: farense trains with the supervised loss "
                        "(mlx-lm's 'normal') only; set training_mode: normal or remove it, or train GRPO with "
                        "mlx-lm")


def _map_lora(v: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """fine_tune_type and lora_parameters -> farense's [lora]."""
    lora: dict[str, Any] = {"num_layers": v["num_layers"]}
    ftt = v["fine_tune_type"]
    if ftt in ("lora", "dora"):
        lora["type"] = ftt
    elif ftt == "full":
        problems.append("fine_tune_type: 'full' trains every weight of the model; farense trains, checkpoints "
                        "and promotes LoRA/DoRA adapters only. Use 'lora' or 'dora', or mlx_lm.lora for full "
                        "fine-tuning")
    else:
        problems.append(f"fine_tune_type: expected 'lora', 'dora' (or mlx-lm's 'full'), got {ftt!r}")
    params = v["lora_parameters"]
    for k in params:
        if k == "alpha" and "scale" not in params:
            continue  # reported once, as the missing scale
        if k not in LORA_PARAMETER_KEYS:
            hint = ("; mlx-lm's LoRA config uses 'scale', not 'alpha'" if k == "alpha"
                    else _did_you_mean(str(k), list(LORA_PARAMETER_KEYS)))
            problems.append(f"lora_parameters.{k}: not an mlx-lm LoRA parameter{hint}; expected "
                            f"{', '.join(LORA_PARAMETER_KEYS)}")
    for k in ("rank", "scale", "dropout"):
        if k not in params:
            hint = " (found 'alpha': mlx-lm's LoRA config uses 'scale')" if k == "scale" and "alpha" in params else ""
            problems.append(f"lora_parameters.{k}: missing; mlx-lm's LoRA layers need rank, scale and dropout{hint}")
        else:
            lora[k] = params[k]
    lora["keys"] = params["keys"] if params.get("keys") is not None else []  # none: every linear layer, as mlx-lm
    return lora


def _map_training(v: dict[str, Any], problems: list[str], notes: list[str]) -> tuple[dict[str, Any], int]:
    """Batches, accumulation and iters (micro-batches in mlx-lm) -> farense's [training] in optimizer steps."""
    accum = v["grad_accumulation_steps"]
    training: dict[str, Any] = {
        "batch_size": v["batch_size"], "grad_accumulation": accum, "max_seq_length": v["max_seq_length"],
        "seed": v["seed"], "grad_checkpoint": bool(v["grad_checkpoint"]), "mask_prompt": bool(v["mask_prompt"]),
        "epochs": 0,
    }
    total = 0
    if isinstance(accum, int) and accum >= 1:
        total = v["iters"] // accum
        training["iters"] = total
        if total < 1:
            problems.append(f"iters: {v['iters']} micro-batches with grad_accumulation_steps {accum} make no "
                            "optimizer step")
        elif v["iters"] % accum:
            notes.append(f"iters: {v['iters']} micro-batches = {total} optimizer steps of {accum}; mlx-lm never "
                         f"applies the last {v['iters'] % accum}")
    else:
        problems.append(f"grad_accumulation_steps: expected an integer >= 1, got {accum!r}")
    return training, total


def _map_schedule(raw: Mapping[str, Any], v: dict[str, Any], training: dict[str, Any], total: int,
                  problems: list[str], notes: list[str]) -> None:
    """learning_rate / lr_schedule -> schedule, learning_rate, min_learning_rate, warmup_steps."""
    sched = v["lr_schedule"]
    if sched is None:
        training.update(learning_rate=float(v["learning_rate"]), schedule="constant", warmup_steps=0,
                        min_learning_rate=0.0)
        return
    for k in sched:
        if k not in SCHEDULE_KEYS:
            problems.append(f"lr_schedule.{k}: not an mlx-lm schedule key{_did_you_mean(str(k), list(SCHEDULE_KEYS))};"
                            f" expected {', '.join(SCHEDULE_KEYS)}")
    name, args = sched.get("name"), sched.get("arguments")
    if not isinstance(args, list) or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        problems.append(f"lr_schedule.arguments: expected a list of numbers, got {args!r}")
        return
    warmup = sched.get("warmup") or 0
    warmup_init = sched.get("warmup_init") or 0.0
    if name == "cosine_decay" and len(args) in (2, 3):
        init, decay, end = float(args[0]), int(args[1]), float(args[2]) if len(args) == 3 else 0.0
        training.update(schedule="cosine", learning_rate=init, min_learning_rate=end)
    elif name == "linear_schedule" and len(args) == 3:
        init, end, decay = float(args[0]), float(args[1]), int(args[2])
        training.update(schedule="linear", learning_rate=init, min_learning_rate=end)
    elif name in ("cosine_decay", "linear_schedule"):
        want = "[init, decay_steps, end]" if name == "cosine_decay" else "[init, end, steps]"
        problems.append(f"lr_schedule.arguments: {name} takes {want}, got {args!r}")
        return
    else:
        problems.append(f"lr_schedule.name: farense supports cosine_decay and linear_schedule (after a linear "
                        f"warm-up), got {name!r}")
        return
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        problems.append(f"lr_schedule.warmup: expected an integer >= 0, got {warmup!r}")
        return
    training["warmup_steps"] = warmup
    if warmup_init:
        if warmup_init > 0.01 * init:
            problems.append(f"lr_schedule.warmup_init: farense warms up from 0; {warmup_init} is more than 1% of "
                            f"the peak {init}. Set it to 0")
        elif warmup:
            notes.append(f"lr_schedule.warmup_init: {warmup_init} taken as 0 (farense warms up from 0)")
    if total and decay != total - warmup:
        notes.append(f"lr_schedule: farense decays over the {total - warmup} steps after warm-up, reaching "
                     f"{training['min_learning_rate']} at the end; mlx-lm's decay length was {decay}")
    if raw.get("learning_rate") is not None and float(raw["learning_rate"]) != init:
        notes.append(f"learning_rate: {raw['learning_rate']} is ignored when lr_schedule is set (as in mlx-lm); "
                     f"the peak is the schedule's {init}")


def _map_optimizer(raw: Mapping[str, Any], v: dict[str, Any], training: dict[str, Any], problems: list[str],
                   notes: list[str]) -> None:
    """optimizer / optimizer_config -> training.optimizer, training.weight_decay."""
    opt = str(v["optimizer"]).lower()
    if opt not in OPTIMIZERS:
        problems.append(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {v['optimizer']!r}")
        return
    if opt not in ("adam", "adamw"):
        problems.append(f"optimizer: farense trains with adam or adamw, got {opt!r}")
        return
    training["optimizer"] = opt
    cfgs = raw.get("optimizer_config") or {}
    for k, settings in cfgs.items():
        if k not in OPTIMIZERS:
            problems.append(f"optimizer_config.{k}: not an mlx-lm optimizer{_did_you_mean(str(k), list(OPTIMIZERS))}")
        elif k != opt and settings:
            notes.append(f"optimizer_config.{k}: ignored (the optimizer is {opt}), as mlx-lm does")
    mine = cfgs.get(opt) or {}
    if not isinstance(mine, dict):
        problems.append(f"optimizer_config.{opt}: expected a mapping, got {mine!r}")
        return
    allowed = {**ADAM_DEFAULTS, **({"weight_decay": ADAMW_WEIGHT_DECAY} if opt == "adamw" else {})}
    for k, value in mine.items():
        if k not in allowed:
            problems.append(f"optimizer_config.{opt}.{k}: not a setting farense passes to {opt}"
                            f"{_did_you_mean(str(k), list(allowed))}; expected {', '.join(allowed)}")
        elif k != "weight_decay" and _normal(value) != _normal(allowed[k]):
            problems.append(f"optimizer_config.{opt}.{k}: farense uses mlx's default {allowed[k]!r}, got {value!r}")
    training["weight_decay"] = float(mine.get("weight_decay", ADAMW_WEIGHT_DECAY)) if opt == "adamw" else 0.0


def _normal(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [float(x) for x in v]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return v


def import_lora_yaml(path: str | os.PathLike[str], *, name: str | None = None) -> ImportedConfig:
    """Read an mlx-lm lora YAML and translate it; the config is named after the file unless `name`."""
    path = Path(path)
    raw = read_yaml(path)
    cfg_name = name or re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-") or "imported"
    return import_lora_config(raw, name=cfg_name, source=str(path))


# --------------------------------------------------------------------------- export


EXPORT_RECORD = "farense_export.json"


def _adapter_files(run_dir: Path) -> tuple[RunPaths, dict[str, Any]]:
    paths = RunPaths(run_dir)
    for f in (paths.best_adapters, paths.best_adapter_config):
        if not f.is_file():
            raise FarenseError(f"cannot export {paths.name}: {f} not found (train the run first: its best "
                               "adapters are written at the first validation)")
    return paths, orjson.loads(paths.best_adapter_config.read_bytes())


def _check_target(out: Path, force: bool) -> None:
    if os.path.lexists(out) and not force:
        raise FarenseError(f"{out} already exists; choose another --out or pass --force to replace it")


def _record(paths: RunPaths, acfg: Mapping[str, Any], **extra: Any) -> bytes:
    import mlx_lm

    return orjson.dumps({
        "format": "farense.export/1",
        "run_name": paths.name,
        "run_dir": str(paths.root),
        "base_model": acfg.get("model"),
        "farense_fingerprint": acfg.get("farense_fingerprint"),
        "adapters_sha256": sha256_file(paths.best_adapters),
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mlx_lm": mlx_lm.__version__,
        **extra,
    }, option=orjson.OPT_INDENT_2)


def export_adapters(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                    force: bool = False) -> Path:
    """Copy the run's best adapters (mlx-lm layout) to `out`, for `mlx_lm.generate --adapter-path`."""
    paths, acfg = _adapter_files(Path(run_dir))
    out = Path(out) if out else paths.root / "export" / "adapters"
    _check_target(out, force)
    with staged_dir(out) as tmp:
        for name in (ADAPTERS_FILE, ADAPTER_CONFIG_FILE, BEST_RECORD_FILE):
            if (paths.adapters / name).is_file():
                shutil.copyfile(paths.adapters / name, tmp / name)
        (tmp / EXPORT_RECORD).write_bytes(_record(paths, acfg, fused=False))
        _check_target(out, force)
        commit_dir(tmp, out, replace=True)
    return out


def fuse_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
             dequantize: bool = False, force: bool = False,
             log: Callable[[str], None] = lambda m: None) -> Path:
    """Fuse the run's best adapters into its base model and save a standalone mlx-lm model at `out`.

    mlx_lm.fuse's steps (load, `module.fuse()` on every adapted layer, mlx_lm.utils.save), written into
    a temporary directory beside `out` and renamed into place, so `out` is never half written. A base
    that farense quantized on load (model.quantize_bits) is quantized the same way first.
    """
    import mlx.nn as nn
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model, load, save

    paths, acfg = _adapter_files(Path(run_dir))
    out = Path(out) if out else paths.root / "export" / "fused_model"
    _check_target(out, force)
    base = acfg.get("model")
    bits, group, workspace = 0, 64, "."
    try:
        cfg = config_from_json(paths.config)
        base = base or cfg.model_path
        bits, group, workspace = cfg.model.quantize_bits, cfg.model.quantize_group_size, cfg.workspace
    except (OSError, ValueError, FarenseError):
        pass  # adapters copied without their run: the adapter config names the base model
    if not base:
        raise FarenseError(f"cannot export {paths.name}: adapter_config.json names no base model")

    base = resolve_model_path(base, workspace)  # a .gguf base: its imported directory (imported if need be)

    log(f"loading {base}")
    model, tokenizer, model_config = load(base, return_config=True)
    if bits:
        nn.quantize(model, group_size=group, bits=bits)
        model_config["quantization"] = {"group_size": group, "bits": bits}
    load_adapters(model, str(paths.adapters))
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if not fused:
        raise FarenseError(f"{paths.adapters}: no adapter layers to fuse")
    model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        model_config.pop("quantization", None)
        model_config.pop("quantization_config", None)

    with staged_dir(out) as tmp:
        log(f"fusing {len(fused)} adapted layers into {out}")
        save(tmp, base, model, tokenizer, model_config, donate_model=False)
        (tmp / EXPORT_RECORD).write_bytes(_record(paths, acfg, fused=True, dequantized=dequantize,
                                                  fused_layers=len(fused)))
        _check_target(out, force)
        commit_dir(tmp, out, replace=True)
    return out
