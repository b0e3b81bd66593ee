"""farense.config: loading, inheritance, overlays, fingerprints, sizes and every bad-input case."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from farense.config import (
    ExperimentConfig,
    Size,
    build_config,
    check_world_size,
    config_from_json,
    config_to_json,
    config_to_toml,
    diff_configs,
    find_config,
    fingerprint_diff,
    format_size,
    load_config,
    parse_size,
)
from farense.errors import ConfigError
from farense.train.inputs import check_inputs

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

SHIPPED = sorted(p.stem for p in CONFIGS.glob("*.toml"))
OVERLAYS = sorted(p.stem for p in (CONFIGS / "overlays").glob("*.toml"))


def load(name: str, **kw) -> ExperimentConfig:
    return load_config(name, config_dir=CONFIGS, **kw)


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    return str(excinfo.value)


# --------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("overlays", [(), *[(o,) for o in OVERLAYS]], ids=lambda o: "+".join(o) or "plain")
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_validates(name, overlays):
    cfg = load(name, overlays=overlays)
    assert cfg.name == name
    assert len(cfg.fingerprint) == 16
    assert cfg.chain[-1].endswith(tuple(f"{o}.toml" for o in overlays) or f"{name}.toml")


def test_shipped_configs_are_the_seeds_two():
    assert {"v1", "v2"} <= set(SHIPPED)
    assert "demo" in OVERLAYS


def test_v1_carries_the_seed_values():
    c = load("v1")
    assert (c.lora.rank, c.lora.dropout) == (8, 0.0)
    assert (c.training.batch_size, c.training.grad_accumulation) == (4, 2)
    assert c.training.learning_rate == pytest.approx(5e-4)
    assert c.early_stopping.patience == 0  # no early stopping
    assert c.model.path == "mlx-community/Mistral-7B-Instruct-v0.3-4bit" and not c.model_is_local
    assert c.checkpoint.every_steps == 200
    assert (c.decision.max_gap, c.decision.min_f1) == (0.15, 0.93)
    assert c.lora.type == "lora"
    assert c.training.schedule == "cosine" and c.training.warmup_steps == 50


def test_v2_carries_the_seed_values():
    c = load("v2")
    assert (c.lora.rank, c.lora.dropout) == (6, 0.08)
    assert (c.training.batch_size, c.training.grad_accumulation) == (2, 4)
    assert c.training.learning_rate == pytest.approx(2e-4)
    assert (c.early_stopping.patience, c.early_stopping.min_delta) == (5, 0.001)
    assert (c.decision.max_gap, c.decision.min_f1) == (0.15, 0.93)


def test_v2_inherits_everything_else_from_v1():
    v1, v2 = load("v1"), load("v2")
    for sec in ("model", "data", "checkpoint", "disk", "overfitting", "evaluation", "decision", "output", "validation"):
        assert getattr(v2, sec) == getattr(v1, sec), sec
    for key in ("schedule", "warmup_steps", "epochs", "seed", "max_seq_length", "grad_checkpoint", "mask_prompt"):
        assert getattr(v2.training, key) == getattr(v1.training, key), key
    assert v2.lora.keys == v1.lora.keys and v2.lora.scale == v1.lora.scale
    assert [Path(p).name for p in v2.chain] == ["v1.toml", "v2.toml"]
    assert v2.name == "v2" and v2.description != v1.description


def test_tiny_overlay_changes_scale_not_the_experiment():
    v2, demo = load("v2"), load("v2", overlays=["tiny"])
    assert demo.name == "v2"  # an overlay never renames
    assert demo.training.iters == 150 and demo.training.epochs == 0
    assert demo.model_is_local and demo.model.path == ".farense/tiny/model"
    assert (demo.lora.rank, demo.lora.dropout, demo.training.batch_size) == (6, 0.08, 2)
    assert demo.fingerprint != v2.fingerprint
    assert Path(demo.chain[-1]).name == "tiny.toml"


# --------------------------------------------------------------------------- extends and overlays


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_a_child_without_a_name_is_named_by_its_file(tmp_path):
    write(tmp_path / "base.toml", f'extends = "{CONFIGS / "v1.toml"}"\nname = "base"\n')
    write(tmp_path / "child.toml", 'extends = "base"\n[lora]\nrank = 4\n')
    c = load_config(tmp_path / "child.toml")
    assert c.name == "child" and c.lora.rank == 4
    assert [Path(p).name for p in c.chain] == ["v1.toml", "base.toml", "child.toml"]


def test_extends_a_list_applies_parents_left_to_right_then_the_child(tmp_path):
    write(tmp_path / "a.toml", f'extends = "{CONFIGS / "v1.toml"}"\n[lora]\nrank = 4\nscale = 10.0\n')
    write(tmp_path / "b.toml", "[lora]\nrank = 5\ndropout = 0.1\n")
    write(tmp_path / "c.toml", 'extends = ["a.toml", "b.toml"]\n[lora]\ndropout = 0.2\n')
    c = load_config(tmp_path / "c.toml")
    assert (c.lora.rank, c.lora.scale, c.lora.dropout) == (5, 10.0, 0.2)
    assert c.training.batch_size == 4  # from v1 through a
    assert [Path(p).name for p in c.chain] == ["v1.toml", "a.toml", "b.toml", "c.toml"]


def test_extends_cycle_is_refused(tmp_path):
    write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    write(tmp_path / "b.toml", 'extends = "a"\n')
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "a.toml")
    assert "circular inheritance (a.toml -> b.toml -> a.toml)" in str(e.value)


def test_extends_itself_is_refused(tmp_path):
    write(tmp_path / "a.toml", 'extends = "a.toml"\n')
    with pytest.raises(ConfigError, match=r"circular inheritance \(a.toml -> a.toml\)"):
        load_config(tmp_path / "a.toml")


def test_extends_a_missing_parent_names_both_files(tmp_path):
    child = write(tmp_path / "child.toml", 'extends = "nope.toml"\n')
    with pytest.raises(ConfigError) as e:
        load_config(child)
    msg = str(e.value)
    assert str(child.resolve()) in msg and "extends: parent config 'nope.toml' not found" in msg
    assert str(tmp_path.resolve() / "nope.toml") in msg


def test_extends_of_the_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match=r"extends: expected a file name or a list of them, got 5"):
        load_config(write(tmp_path / "x.toml", "extends = 5\n"))


def test_overlay_by_path_applies_after_extends(tmp_path):
    ov = write(tmp_path / "small.toml", "[training]\nbatch_size = 1\n[checkpoint]\nkeep_last = 1\n")
    c = load("v2", overlays=[str(ov)])
    assert (c.training.batch_size, c.checkpoint.keep_last, c.lora.rank) == (1, 1, 6)


def test_unknown_overlay_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"no overlay named 'demi'.*known: demo"):
        load("v2", overlays=["demi"])


def test_unknown_config_name_suggests_one():
    with pytest.raises(ConfigError) as e:
        find_config("v2x", CONFIGS)
    msg = str(e.value)
    assert "no config named 'v2x'" in msg and "(did you mean 'v2'?)" in msg and "known: v1, v2" in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found: .*nothere.toml"):
        load_config(tmp_path / "nothere.toml")


def test_a_bad_value_from_an_overlay_names_the_overlay(tmp_path):
    ov = write(tmp_path / "bad.toml", "[lora]\nrank = 0\n")
    with pytest.raises(ConfigError) as e:
        load("v2", overlays=[str(ov)])
    msg = str(e.value)
    assert "v2.toml" in msg  # the config being loaded
    assert f"lora.rank: expected an integer >= 1, got 0 [set in {ov.resolve()}]" in msg


def test_a_bad_value_from_a_parent_names_the_parent(tmp_path):
    parent = write(tmp_path / "parent.toml", f'extends = "{CONFIGS / "v1.toml"}"\n[lora]\ndropout = 1.5\n')
    child = write(tmp_path / "child.toml", 'extends = "parent"\n[lora]\nrank = 0\n')
    with pytest.raises(ConfigError) as e:
        load_config(child)
    msg = str(e.value)
    assert f"lora.dropout: expected 0 <= dropout < 1, got 1.5 [set in {parent.resolve()}]" in msg
    assert "lora.rank: expected an integer >= 1, got 0\n" in msg + "\n"  # set in the file itself: no note


# --------------------------------------------------------------------------- fingerprints


def test_fingerprint_is_stable_across_loads_and_workspaces(tmp_path):
    a = load("v2", workspace=tmp_path / "one")
    b = load("v2", workspace=tmp_path / "two")
    assert a.fingerprint == b.fingerprint == load("v2").fingerprint
    assert a.run_dir != b.run_dir and a.run_dir == (tmp_path / "one").resolve() / "runs" / "v2"


def test_fingerprint_does_not_depend_on_name_or_description():
    v2 = load("v2")
    other = build_config({**v2.to_dict(), "name": "other", "description": "something else"})
    assert other.fingerprint == v2.fingerprint


NON_TRAINING = [
    ("checkpoint", "every_steps", 100),
    ("checkpoint", "keep_last", 1),
    ("checkpoint", "keep_best", False),
    ("disk", "low_free", "30GB"),
    ("disk", "flood_used_percent", 99.0),
    ("disk", "check_interval_seconds", 5.0),
    ("output", "runs_dir", "/elsewhere/runs"),
    ("output", "production_dir", "prod"),
    ("output", "run_name", "v2-again"),
    ("decision", "max_gap", 0.2),
    ("decision", "min_f1", 0.9),
    ("evaluation", "max_new_tokens", 16),
    ("overfitting", "bom_below", 0.2),
]


@pytest.mark.parametrize("sec,key,value", NON_TRAINING, ids=lambda x: str(x))
def test_fingerprint_ignores_non_training_fields(sec, key, value):
    v2 = load("v2")
    changed = v2.with_overrides(**{sec: {key: value}})
    assert getattr(getattr(changed, sec), key) != getattr(getattr(v2, sec), key)
    assert changed.fingerprint == v2.fingerprint


TRAINING = [
    ("model", "path", "mlx-community/other-model"),
    ("model", "quantize_bits", 4),
    ("data", "dir", "other-data"),
    ("lora", "type", "dora"),
    ("lora", "rank", 16),
    ("lora", "scale", 10.0),
    ("lora", "dropout", 0.05),
    ("lora", "num_layers", 8),
    ("lora", "keys", ["self_attn.q_proj"]),
    ("training", "batch_size", 8),
    ("training", "grad_accumulation", 1),
    ("training", "learning_rate", 1e-4),
    ("training", "schedule", "linear"),
    ("training", "warmup_steps", 0),
    ("training", "epochs", 4),
    ("training", "max_seq_length", 1024),
    ("training", "seed", 7),
    ("training", "grad_checkpoint", False),
    ("training", "mask_prompt", False),
    ("validation", "every_steps", 25),
    ("early_stopping", "patience", 3),
    ("early_stopping", "min_delta", 0.01),
]


@pytest.mark.parametrize("sec,key,value", TRAINING, ids=lambda x: str(x))
def test_fingerprint_changes_with_each_training_field(sec, key, value):
    v2 = load("v2")
    changed = v2.with_overrides(**{sec: {key: value}})
    assert changed.fingerprint != v2.fingerprint
    assert fingerprint_diff(v2.fingerprint_fields(), changed) == [
        (f"{sec}.{key}", getattr(getattr(v2, sec), key), value)
    ]


def test_fingerprint_fields_cover_training_sections_only():
    sections = {k.split(".")[0] for k in load("v1").fingerprint_fields()}
    assert sections == {"model", "data", "lora", "training", "validation", "early_stopping"}


def test_fingerprint_survives_config_json_round_trip(tmp_path):
    v2 = load("v2", overlays=["tiny"], workspace=tmp_path)
    p = tmp_path / "config.json"
    p.write_bytes(config_to_json(v2))
    back = config_from_json(p)
    assert back == v2 and back.fingerprint == v2.fingerprint
    assert config_from_json(p, workspace=tmp_path / "moved").fingerprint == v2.fingerprint


def test_config_to_toml_loads_back_to_the_same_config(tmp_path):
    v2 = load("v2")
    p = tmp_path / "resolved.toml"
    p.write_text(config_to_toml(v2))
    back = load_config(p)
    assert back.fingerprint == v2.fingerprint and back.to_dict() == v2.to_dict()


# --------------------------------------------------------------------------- diff, frozen


def test_diff_lists_exactly_the_v1_v2_differences():
    rows = diff_configs(load("v1"), load("v2"))
    assert {k: (a, b) for k, a, b in rows if k != "description"} == {
        "name": ("v1", "v2"),
        "lora.rank": (8, 6),
        "lora.dropout": (0.0, 0.08),
        "training.batch_size": (4, 2),
        "training.grad_accumulation": (2, 4),
        "training.learning_rate": (5e-4, 2e-4),
        "training.min_learning_rate": (5e-6, 2e-6),
        "early_stopping.patience": (0, 5),
        "early_stopping.min_delta": (0.0, 0.001),
    }
    assert "description" in {k for k, _, _ in rows}


def test_diff_of_a_config_with_itself_is_empty():
    assert diff_configs(load("v2"), load("v2")) == []


def test_configs_are_frozen():
    c = load("v2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lora.rank = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.training = c.training  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.disk.low_free = Size(1)  # type: ignore[misc]


def test_list_fields_are_not_shared_between_instances():
    a, b = load("v1"), load("v1")
    assert a.lora.keys == b.lora.keys and a.lora.keys is not b.lora.keys


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "value,expected",
    [
        (0, 0),
        (1234, 1234),
        ("20GB", 20 * 10**9),
        ("20gb", 20 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5 GB", 1_500_000_000),
        ("2GiB", 2 * 2**30),
        ("100MB", 100 * 10**6),
        ("10k", 10_000),
        ("1TB", 10**12),
        ("42", 42),
        ("7B", 7),
    ],
)
def test_parse_size(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["", "GB", "20 gigs", "-5GB", "5XB", "5 G B", "1e9", True, -1])
def test_parse_size_refuses_bad_sizes(value):
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(value)


def test_sizes_in_a_config(tmp_path):
    c = load("v1")
    assert c.disk.low_free == 20 * 10**9 and isinstance(c.disk.low_free, Size)
    d = c.with_overrides(disk={"low_free": "512MiB", "high_free": 300_000_000, "flood_free": "100MB"})
    assert (d.disk.low_free, d.disk.high_free, d.disk.flood_free) == (512 * 2**20, 300_000_000, 100 * 10**6)
    assert type(d.sections()["disk"]["low_free"]) is int  # plain ints in to_dict(), for TOML and JSON


def test_format_size():
    assert format_size(999) == "999 B"
    assert format_size(20 * 10**9) == "20.0 GB"
    assert format_size(1_500_000) == "1.5 MB"
    assert format_size(5 * 10**15) == "5000.0 TB"


# --------------------------------------------------------------------------- bad input


def bad(overrides: dict) -> str:
    """The ConfigError message of v1 with some raw (TOML-level) values replaced."""
    data = load("v1").to_dict()
    for sec, values in overrides.items():
        data[sec] = {**data[sec], **values} if isinstance(values, dict) and isinstance(data.get(sec), dict) else values
    with pytest.raises(ConfigError) as e:
        build_config(data, source="configs/bad.toml")
    msg = str(e.value)
    assert msg.startswith("Config is not well-formed (configs/bad.toml)")
    return msg


BAD = [
    # unknown keys
    ({"lora": {"rnak": 4}}, ["lora.rnak: unknown key (did you mean 'rank'?)"]),
    ({"lora": {"alpha": 16}}, ["lora.alpha: unknown key; expected one of type, rank, scale, dropout"]),
    ({"training": {"learning_rte": 1e-4}}, ["training.learning_rte: unknown key (did you mean 'learning_rate'?)"]),
    ({"trainig": {"seed": 1}}, ["trainig: unknown key (did you mean 'training'?)"]),
    # wrong types
    ({"lora": {"rank": 8.0}}, ["lora.rank: expected an integer, got float 8.0"]),
    ({"lora": {"rank": True}}, ["lora.rank: expected an integer, got bool True"]),
    ({"training": {"batch_size": "4"}}, ["training.batch_size: expected an integer, got str '4'"]),
    ({"training": {"learning_rate": "5e-4"}}, ["training.learning_rate: expected a number, got str '5e-4'"]),
    ({"training": {"mask_prompt": 1}}, ["training.mask_prompt: expected true or false, got int 1"]),
    ({"lora": {"keys": "self_attn.q_proj"}}, ["lora.keys: expected a list of strings"]),
    ({"lora": {"keys": [1, 2]}}, ["lora.keys: expected a list of strings"]),
    ({"model": {"path": 7}}, ["model.path: expected a string, got int 7"]),
    ({"lora": 3}, ["lora: expected a table [lora], got int"]),
    ({"disk": {"low_free": "lots"}}, ["disk.low_free: expected a size such as 20GB, 512MiB or a number of bytes, got 'lots'"]),
    ({"disk": {"reserve": -1}}, ["disk.reserve: expected a size >= 0, got -1"]),
    # out of range
    ({"lora": {"rank": 0}}, ["lora.rank: expected an integer >= 1, got 0"]),
    ({"lora": {"dropout": 1.5}}, ["lora.dropout: expected 0 <= dropout < 1, got 1.5"]),
    ({"lora": {"type": "qlora"}}, ["lora.type: expected 'lora' or 'dora', got 'qlora'"]),
    ({"lora": {"num_layers": 0}}, ["lora.num_layers: expected a positive number of layers or -1 for all, got 0"]),
    ({"training": {"learning_rate": -1e-4}}, ["training.learning_rate: expected a number > 0, got -0.0001"]),
    ({"training": {"batch_size": 0}}, ["training.batch_size: expected an integer >= 1, got 0"]),
    ({"training": {"grad_accumulation": 0}}, ["training.grad_accumulation: expected an integer >= 1, got 0"]),
    ({"training": {"schedule": "step"}}, ["training.schedule: expected one of constant, cosine, linear, got 'step'"]),
    ({"training": {"iters": 100}}, ["set exactly one of them to a positive number (got iters=100, epochs=3)"]),
    ({"training": {"epochs": 0}}, ["set exactly one of them to a positive number (got iters=0, epochs=0)"]),
    ({"training": {"max_seq_length": 4}}, ["training.max_seq_length: expected an integer >= 8, got 4"]),
    ({"training": {"min_learning_rate": 1.0}}, ["training.min_learning_rate: expected 0 <= min_learning_rate <= learning_rate"]),
    ({"model": {"quantize_bits": 3}}, ["model.quantize_bits: expected 0, 4 or 8, got 3"]),
    ({"model": {"path": ""}}, ["model.path: expected a model directory or a Hugging Face repo id, got nothing"]),
    ({"data": {"dir": ""}}, ["data.dir: expected a directory with train.jsonl and valid.jsonl, got nothing"]),
    ({"checkpoint": {"keep_last": 0}}, ["checkpoint.keep_last: expected an integer >= 1 (the latest is needed to resume), got 0"]),
    ({"checkpoint": {"every_steps": 0}}, ["checkpoint.every_steps: expected an integer >= 1, got 0"]),
    ({"early_stopping": {"patience": -1}}, ["early_stopping.patience: expected an integer >= 0 (0 disables), got -1"]),
    ({"early_stopping": {"min_delta": -0.1}}, ["early_stopping.min_delta: expected a number >= 0, got -0.1"]),
    ({"disk": {"high_used_percent": 80.0}}, ["disk: expected low_used_percent <= high_used_percent <= flood_used_percent"]),
    ({"disk": {"flood_used_percent": 101.0}}, ["disk.flood_used_percent: expected a percentage in (0, 100], got 101.0"]),
    ({"disk": {"flood_free": "30GB"}}, ["disk: expected low_free >= high_free >= flood_free, got 20.0 GB / 10.0 GB / 30.0 GB"]),
    ({"decision": {"min_f1": 1.5}}, ["decision.min_f1: expected a number in [0, 1], got 1.5"]),
    ({"overfitting": {"bom_below": 0.01}}, ["overfitting: expected 0 < excelente_below <= bom_below <= moderado_below"]),
    ({"output": {"run_name": "a b"}}, ["output.run_name: expected letters, digits, '.', '_' or '-' (one path "
                                       "component, not '.' or '..'), got 'a b'"]),
    ({"output": {"run_name": "."}}, ["output.run_name: expected letters, digits, '.', '_' or '-' (one path "
                                     "component, not '.' or '..'), got '.'"]),
    ({"output": {"run_name": ".."}}, ["output.run_name: expected letters, digits, '.', '_' or '-' (one path "
                                      "component, not '.' or '..'), got '..'"]),
    ({"name": "v 2"}, ["name: expected letters, digits, '.', '_' or '-' (not '.' or '..'), got 'v 2'"]),
    ({"name": ".."}, ["name: expected letters, digits, '.', '_' or '-' (not '.' or '..'), got '..'"]),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=lambda x: str(x)[:60] if isinstance(x, dict) else "")
def test_bad_input_is_refused_with_key_and_expectation(overrides, expected):
    msg = bad(overrides)
    for part in expected:
        assert part in msg


def test_a_bad_learning_rate_is_reported_once():
    msg = bad({"training": {"learning_rate": -1.0}})
    assert "training.learning_rate: expected a number > 0, got -1.0" in msg and "min_learning_rate" not in msg


def test_cross_field_checks_run_once_fields_are_valid():
    v1 = load("v1")
    data = v1.to_dict()
    data["training"] = {**data["training"], "epochs": 0, "iters": 100}
    data["checkpoint"] = {**data["checkpoint"], "every_steps": 500}
    with pytest.raises(ConfigError, match=r"checkpoint.every_steps: 500 is more than training.iters \(100\)"):
        build_config(data)


def test_every_problem_is_gathered_into_one_error():
    msg = bad({"lora": {"rank": 0, "dropout": 1.5, "rnak": 1}, "checkpoint": {"keep_last": 0}})
    assert ", found the following errors:" in msg
    assert msg.count("\n  - ") == 4


def test_toml_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path / "broken.toml", "[lora]\nrank = 8\ndropout = \n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "TOML syntax error" in str(e.value) and "line 3" in str(e.value)


def test_bad_values_in_a_file_name_the_file(write_config):
    p = write_config({"lora": {"rank": 0}, "checkpoint": {"keep_last": 0}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.source == str(p)
    assert str(p) in str(e.value) and len(e.value.problems) == 2


# --------------------------------------------------------------------------- world size, inputs


def test_check_world_size():
    v2 = load("v2")  # batch_size 2
    check_world_size(v2, 1)
    check_world_size(v2, 2)
    with pytest.raises(ConfigError) as e:
        check_world_size(v2, 3)
    msg = str(e.value)
    assert "v2.toml" in msg and "training.batch_size: 2 examples cannot be split equally across 3 ranks" in msg
    assert "expected a multiple of 3" in msg
    with pytest.raises(ConfigError, match="expected an integer >= 1, got 0"):
        check_world_size(v2, 0)


def test_check_inputs_accepts_a_local_model_and_data(write_config):
    check_inputs(load_config(write_config()))


def test_check_inputs_missing_model_directory(write_config, tmp_path):
    p = write_config({"model": {"path": str(tmp_path / "no-model")}})
    with pytest.raises(ConfigError) as e:
        check_inputs(load_config(p))
    msg = str(e.value)
    assert str(p) in msg and f"model.path: model directory not found: {tmp_path / 'no-model'}" in msg


@pytest.mark.parametrize("missing,expected", [("config.json", "has no config.json"), ("model.safetensors", "has no *.safetensors")])
def test_check_inputs_incomplete_model_directory(write_config, model_dir, missing, expected):
    (model_dir / missing).unlink()
    with pytest.raises(ConfigError, match=f"model.path: .*{re.escape(expected)}"):
        check_inputs(load_config(write_config()))


def test_check_inputs_missing_data(write_config, data_dir, tmp_path):
    (data_dir / "valid.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"data.dir: .*valid.jsonl not found \(the valid split is required\)"):
        check_inputs(load_config(write_config()))
    with pytest.raises(ConfigError, match=r"data.dir: directory not found: .*nodata"):
        check_inputs(load_config(write_config({"data": {"dir": str(tmp_path / "nodata")}})))


def test_check_inputs_hub_model_offline_and_not_cached(write_config, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    cfg = load_config(write_config({"model": {"path": "someone/not-cached-model"}}))
    assert not cfg.model_is_local
    with pytest.raises(ConfigError, match="'someone/not-cached-model' is not in the Hugging Face cache"):
        check_inputs(cfg)


def test_relative_paths_resolve_against_the_workspace(tmp_path):
    c = load("v2", overlays=["tiny"], workspace=tmp_path)
    assert c.model_is_local and c.model_path == str(tmp_path.resolve() / ".farense/tiny/model")
    assert c.data_dir == tmp_path.resolve() / ".farense/tiny/data"
    assert c.production_dir == tmp_path.resolve() / "production/tiny"


def test_loading_a_config_and_validating_data_imports_nothing_heavy(write_config):
    path = write_config()
    code = textwrap.dedent(f"""
        import sys
        from farense.config import load_config
        from farense.train.inputs import check_inputs
        from farense.train.data import validate_data
        cfg = load_config({str(path)!r})
        check_inputs(cfg)
        validate_data(cfg)
        heavy = [m for m in ("mlx.core", "mlx_lm", "prefect") if m in sys.modules]
        assert not heavy, heavy
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr


def test_check_inputs_refuses_more_lora_layers_than_the_model_has(write_config, model_dir, tmp_path):
    """Found from config.json before any weight is loaded (mlx-lm finds it only after loading)."""
    import json

    from farense.config import load_config
    from farense.errors import ConfigError
    from farense.train.inputs import check_inputs

    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    cfg = load_config(write_config({"lora": {"num_layers": 16}}), workspace=tmp_path)
    with pytest.raises(ConfigError, match=r"lora.num_layers: requested to train 16 layers but the model only has 4"):
        check_inputs(cfg)
    check_inputs(load_config(write_config({"lora": {"num_layers": -1}}, name="all"), workspace=tmp_path))


def test_a_run_is_never_created_inside_another_run_or_around_one(write_config, tmp_path):
    """Issue 13.1: runs/demo as a run would hold the demo overlay's runs/demo/v2 (and cleanup would
    take it as its extras); both orders are refused before training."""
    runs = tmp_path / "runs"
    (runs / "demo" / "v2" / "checkpoints").mkdir(parents=True)  # the demo overlay's run
    outer = load_config(write_config({"output": {"runs_dir": str(runs), "run_name": "demo"}}))
    with pytest.raises(ConfigError, match=r"output.run_name: .*runs/demo holds other runs \(.*runs/demo/v2\)"):
        check_inputs(outer)
    (runs / "solo" / "checkpoints").mkdir(parents=True)
    inner = load_config(write_config({"output": {"runs_dir": str(runs / "solo"), "run_name": "v2"}}))
    with pytest.raises(ConfigError, match=r"would lie inside the run .*runs/solo"):
        check_inputs(inner)
    check_inputs(load_config(write_config({"output": {"runs_dir": str(runs / "demo"), "run_name": "v3"}})))


# --------------------------------------------------------------------------- resolved once per run


def test_the_config_records_its_overlays_and_the_resolved_file_is_what_trains(write_config, tmp_path):
    """The flow resolves once; the trainer child reads the resolved file, so an edit of the TOML
    between the check and the training changes nothing, overlays included."""
    from farense.train.inputs import write_resolved_config
    from farense.train.supervisor import trainer_command

    toml = write_config({"training": {"learning_rate": 3e-4}, "output": {"runs_dir": str(tmp_path / "runs")}})
    checked = load_config(toml, overlays=["tiny"], workspace=tmp_path)
    assert checked.overlays == ("tiny",)
    resolved = write_resolved_config(checked)
    assert resolved == checked.run_dir / "config.resolved.json"
    toml.write_text(toml.read_text().replace("3e-4", "9e-4").replace("0.0003", "0.0009"))
    assert load_config(toml, workspace=tmp_path).training.learning_rate == 9e-4  # the file did change
    trained = load_config(resolved)
    assert trained == checked and trained.fingerprint == checked.fingerprint
    assert trained.training.learning_rate == 3e-4 and trained.overlays == ("tiny",)
    argv = trainer_command(checked, tmp_path / "result.json")
    assert argv[argv.index("train") + 1] == str(resolved) and "--overlay" not in argv


def test_a_resolved_config_refuses_overlays_given_again(write_config, tmp_path):
    resolved = write_config_resolved(write_config, tmp_path)
    with pytest.raises(ConfigError, match="already records its overlays"):
        load_config(resolved, overlays=["tiny"])


def write_config_resolved(write_config, tmp_path) -> Path:
    from farense.train.inputs import write_resolved_config

    toml = write_config({"output": {"runs_dir": str(tmp_path / "runs")}})
    return write_resolved_config(load_config(toml, overlays=["tiny"], workspace=tmp_path))
