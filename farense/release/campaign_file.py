"""Owns the campaign file (configs/campaigns/*.toml): a base config, the trials, the halving budget.

Why: a campaign is decided before any training, like a config: every trial's config is built and
checked, the rungs fall on validation steps, and every problem (file, key, what is expected) is
reported in one error. Each trial trains the full budget's schedule (training.iters = budget), so
stopping it at a rung and continuing it later is an ordinary resume of the same fingerprint.

    base = "v2"                       # a config name or a path (next to this file first)
    set = {"validation.every_steps" = 4}   # changes every trial makes to its config
    [search]                          # a grid: lists, or ranges {min, max, count, log}
    "lora.rank" = [4, 8]
    "training.learning_rate" = {min = 1e-4, max = 2e-3, count = 4, log = true}
    # or explicit trials: [[trials]] name = "v1", config = "v1", set = {"lora.rank" = 4}
    [halving]
    budget = 24  min_resource = 4  eta = 2  max_concurrent = 1  mode = "sync"  metric = "val_loss"
    # no [halving]: the simplest campaign, every trial trained fully on its own schedule, in order,
    # each decided against the one before it (`farense run v1 v2` is this campaign of two configs)
    [final]
    compare_with = "production"  promote = true
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import orjson

from farense.config import ExperimentConfig, find_config, is_plain_name, load_config
from farense.errors import ConfigError
from farense.release.halving import Halving, rung_steps

TOP_KEYS = ("name", "description", "base", "overlays", "set", "search", "trials", "max_trials", "seed", "halving", "final")
HALVING_KEYS = ("budget", "min_resource", "eta", "max_concurrent", "mode", "metric")
FINAL_KEYS = ("compare_with", "promote")
TRIAL_KEYS = ("name", "config", "set")
METRICS = ("val_loss",)
MODES = ("sync", "async")
CAMPAIGN_DIR_PREFIX = "campaign-"
COMMAND_LINE = "command line"  # the source of `farense run A B`'s campaign: no file


@dataclass(frozen=True)
class Trial:
    """One config of the campaign: its name (the run's name), what it changes, the resolved config."""

    name: str
    params: dict[str, Any]
    config: ExperimentConfig


@dataclass(frozen=True)
class CampaignSpec:
    name: str
    source: str
    trials: tuple[Trial, ...]
    budget: int
    min_resource: int
    eta: int
    max_concurrent: int = 1
    mode: str = "sync"
    metric: str = "val_loss"
    compare_with: str = "production"
    promote: bool = True
    description: str = ""
    overlays: tuple[str, ...] = field(default_factory=tuple)
    halves: bool = True  # False: no [halving]; every trial trains fully, in order (farense run v1 v2)

    @property
    def rungs(self) -> tuple[int, ...]:
        return tuple(rung_steps(self.min_resource, self.budget, self.eta)) if self.halves else ()

    @property
    def halving(self) -> Halving:
        return Halving(tuple(t.name for t in self.trials), self.rungs, self.eta, synchronous=self.mode == "sync")

    @property
    def directory(self) -> Path:
        """Where the trials' runs and the decision log live."""
        return self.trials[0].config.runs_dir

    @property
    def fingerprint(self) -> str:
        """What the decisions depend on: the trials' training fingerprints and the halving rule."""
        blob = orjson.dumps({"trials": [[t.name, t.config.fingerprint] for t in self.trials],
                             "rungs": self.rungs, "eta": self.eta, "mode": self.mode, "metric": self.metric})
        return hashlib.sha256(blob).hexdigest()[:16]


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"file not found: {path}", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}", source=str(path)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"TOML syntax error: {e}", source=str(path)) from None


def _int(table: Mapping[str, Any], key: str, default: int | None, least: int, problems: list[str]) -> int:
    v = table.get(key, default)
    if v is None:
        problems.append(f"halving.{key}: missing; expected an integer >= {least}")
        return least
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        problems.append(f"halving.{key}: expected an integer >= {least}, got {v!r}")
        return least
    return v


def _unknown(table: Mapping[str, Any], known: Sequence[str], where: str, problems: list[str]) -> None:
    for k in table:
        if k not in known:
            problems.append(f"{where}{k}: unknown key; expected one of {', '.join(known)}")


def _range_values(key: str, r: Mapping[str, Any], problems: list[str]) -> list[Any]:
    lo, hi, count, log = r.get("min"), r.get("max"), r.get("count", 2), bool(r.get("log", False))
    nums = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (lo, hi))
    if not nums or not isinstance(count, int) or count < 1 or lo > hi or (log and lo <= 0):
        problems.append(f"search.{key}: expected a range {{min, max, count >= 1, log}} with min <= max "
                        f"(min > 0 when log), got {dict(r)!r}")
        return []
    if count == 1:
        return [lo]
    if log:
        vals = [math.exp(math.log(lo) + i * (math.log(hi) - math.log(lo)) / (count - 1)) for i in range(count)]
    else:
        vals = [lo + i * (hi - lo) / (count - 1) for i in range(count)]
    if isinstance(lo, int) and isinstance(hi, int) and not log:
        return sorted({round(v) for v in vals})
    return [float(f"{v:.6g}") for v in vals]


def _flatten_search(table: Mapping[str, Any], prefix: str, problems: list[str]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, list):
            if not v:
                problems.append(f"search.{key}: expected a non-empty list of values")
            out[key] = list(v)
        elif isinstance(v, Mapping) and "min" in v:
            out[key] = _range_values(key, v, problems)
        elif isinstance(v, Mapping):
            out |= _flatten_search(v, f"{key}.", problems)
        else:
            out[key] = [v]
    return out


def _overrides(params: Mapping[str, Any], where: str, problems: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        if key.count(".") != 1:
            problems.append(f"{where}{key}: expected 'section.key' (for example 'lora.rank')")
            continue
        sec, name = key.split(".")
        out.setdefault(sec, {})[name] = value
    return out


def _grid(data: Mapping[str, Any], problems: list[str]) -> list[tuple[str, dict[str, Any]]]:
    space = _flatten_search(data.get("search") or {}, "", problems)
    combos = [dict(zip(space, values)) for values in itertools.product(*space.values())] if space else [{}]
    max_trials = data.get("max_trials")
    if max_trials is not None:
        if isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 1:
            problems.append(f"max_trials: expected an integer >= 1, got {max_trials!r}")
        elif max_trials < len(combos):
            keep = sorted(random.Random(data.get("seed", 0)).sample(range(len(combos)), max_trials))
            combos = [combos[i] for i in keep]
    width = max(2, len(str(len(combos) - 1)))
    return [(f"t{i:0{width}d}", c) for i, c in enumerate(combos)]


def _explicit(data: Mapping[str, Any], problems: list[str]) -> list[tuple[str, str | None, dict[str, Any]]]:
    out = []
    for i, t in enumerate(data.get("trials") or []):
        if not isinstance(t, Mapping):
            problems.append(f"trials[{i}]: expected a table with name, config and set")
            continue
        _unknown(t, TRIAL_KEYS, f"trials[{i}].", problems)
        name = t.get("name", t.get("config", f"t{i:02d}"))
        if not isinstance(name, str) or not is_plain_name(name):
            problems.append(f"trials[{i}].name: expected letters, digits, '.', '_' or '-', got {name!r}")
            continue
        out.append((Path(name).stem, t.get("config"), dict(t.get("set") or {})))
    return out


def _config_path(name: str, here: Path) -> str:
    beside = here.parent / name
    for cand in (beside, beside.with_suffix(".toml")):
        if cand.is_file():
            return str(cand)
    return str(find_config(name))


def _build_trials(data: Mapping[str, Any], path: Path, overlays: Sequence[str], workspace: Any,
                  budget: int | None, problems: list[str]) -> list[Trial]:
    """Every trial's config, each with the full budget's schedule (None: its own); a bad one adds its problems."""
    if data.get("search") and data.get("trials"):
        problems.append("search / trials: give a search space or an explicit list of trials, not both")
    specs = ([(n, None, p) for n, p in _grid(data, problems)] if not data.get("trials")
             else _explicit(data, problems))
    camp = data.get("name") or path.stem
    trials = []
    for name, config_name, params in specs:
        try:
            base = load_config(_config_path(config_name or data.get("base") or "", path), overlays=overlays,
                               workspace=workspace)
            sections = _overrides({**(data.get("set") or {}), **params}, f"{name}: ", problems)
            if budget is not None:
                sections.setdefault("training", {}).update(iters=budget, epochs=0)
            sections["output"] = {"run_name": name,
                                  "runs_dir": str(base.runs_dir / f"{CAMPAIGN_DIR_PREFIX}{camp}")}
            trials.append(Trial(name, dict(params), base.with_overrides(**sections)))
        except ConfigError as e:
            problems.extend(f"trial {name}: {p}" for p in e.problems)
    return trials


def load_campaign(path: str | Path, *, overlays: Sequence[str] = (), workspace: Any = None) -> CampaignSpec:
    """Read and check a campaign file and every trial's config; one ConfigError lists every problem."""
    path = Path(path)
    data = _read(path)
    problems: list[str] = []
    _unknown(data, TOP_KEYS, "", problems)
    h, final = data.get("halving") or {}, data.get("final") or {}
    _unknown(h, HALVING_KEYS, "halving.", problems)
    _unknown(final, FINAL_KEYS, "final.", problems)
    if not data.get("base") and not data.get("trials"):
        problems.append("base: missing; expected a config name or path (or an explicit [[trials]] list)")
    halves = "halving" in data
    budget = _int(h, "budget", None, 1, problems) if halves else 0
    min_resource = _int(h, "min_resource", budget, 1, problems) if halves else 0
    eta = _int(h, "eta", 2, 2, problems)
    max_concurrent = _int(h, "max_concurrent", 1, 1, problems)
    if min_resource > budget:
        problems.append(f"halving.min_resource: expected at most halving.budget ({budget}), got {min_resource}")
    mode, metric = h.get("mode", "sync"), h.get("metric", "val_loss")
    if mode not in MODES:
        problems.append(f"halving.mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if metric not in METRICS:
        problems.append(f"halving.metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    name = data.get("name") or path.stem
    if not isinstance(name, str) or not is_plain_name(name):
        problems.append(f"name: expected letters, digits, '.', '_' or '-', got {name!r}")
    all_overlays = (*data.get("overlays", ()), *overlays)
    trials = [] if problems else _build_trials(data, path, all_overlays, workspace, budget if halves else None,
                                               problems)
    rungs = rung_steps(min_resource, budget, eta) if halves else []
    for t in trials:
        every = t.config.validation.every_steps
        if any(r % every for r in rungs[:-1]):  # the last step always validates
            problems.append(f"trial {t.name}: validation.every_steps ({every}) must divide every rung's step "
                            f"{rungs[:-1]} (a trial is judged at a validation)")
    if len({t.name for t in trials}) != len(trials):
        problems.append("trials: names must be unique")
    if problems:
        raise ConfigError(problems, source=str(path))
    return CampaignSpec(str(name), str(path), tuple(trials), budget, min_resource, eta, max_concurrent, mode, metric,
                        str(final.get("compare_with", "production")), bool(final.get("promote", True)),
                        str(data.get("description", "")), tuple(all_overlays), halves)


def configs_campaign(configs: Sequence[str], *, overlays: Sequence[str] = (), workspace: Any = None) -> CampaignSpec:
    """The simplest campaign, `farense run v1 v2`: each config a trial under its own name and run
    directory, trained fully in order, each decided against the one before it; no halving."""
    problems: list[str] = []
    trials = []
    for ref in configs:
        try:
            config = load_config(ref, overlays=list(overlays), workspace=workspace)
            trials.append(Trial(config.run_name, {}, config))
        except ConfigError as e:
            problems.extend(f"{e.source}: {x}" if e.source else x for x in e.problems)
    if len({t.name for t in trials}) != len(trials):
        problems.append(f"configs: each config may appear once, got {' '.join(configs)}")
    if problems:
        raise ConfigError(problems, source=COMMAND_LINE)
    return CampaignSpec("-".join(t.name for t in trials), COMMAND_LINE, tuple(trials), 0, 0, 2,
                        overlays=tuple(overlays), halves=False)
