"""`farense config show|diff|check`, in-process through cli.main and as the real installed command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from farense.cli import main
from farense.config import load_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
FARENSE = Path(sys.executable).parent / "farense"  # the console script of the interpreter running the tests

V1_V2_KEYS = {
    "name", "description", "lora.rank", "lora.dropout", "training.batch_size", "training.grad_accumulation",
    "training.learning_rate", "training.min_learning_rate", "early_stopping.patience", "early_stopping.min_delta",
}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("FARENSE_CONFIG_DIR", str(CONFIGS))
    monkeypatch.setenv("FARENSE_WORKSPACE", str(REPO))  # restored after the test, also if --workspace sets it


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def run_cli(*argv: str, cwd: Path = REPO) -> tuple[int, str, str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARENSE_")}
    t0 = time.monotonic()
    r = subprocess.run([str(FARENSE), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout, r.stderr, time.monotonic() - t0


# --------------------------------------------------------------------------- show


def test_show_prints_toml_that_loads_back_to_the_same_fingerprint(capsys, tmp_path):
    rc, out, _ = run_main(capsys, "config", "show", "v2")
    assert rc == 0
    v2 = load_config("v2")
    assert f"# training fingerprint: {v2.fingerprint}" in out
    assert "v1.toml" in out.splitlines()[0]  # resolved from the chain
    body = "\n".join(line for line in out.splitlines() if not line.startswith("#"))
    (tmp_path / "resolved.toml").write_text(body)
    back = load_config(tmp_path / "resolved.toml")
    assert back.fingerprint == v2.fingerprint and back.to_dict() == v2.to_dict()


def test_show_json_includes_the_fingerprint_and_chain(capsys):
    rc, out, _ = run_main(capsys, "config", "show", "v2", "--json")
    assert rc == 0
    payload = json.loads(out)
    assert payload["fingerprint"] == load_config("v2").fingerprint
    assert [Path(p).name for p in payload["chain"]] == ["v1.toml", "v2.toml"]
    assert payload["lora"]["rank"] == 6 and payload["training"]["batch_size"] == 2
    assert payload["early_stopping"] == {"patience": 5, "min_delta": 0.001}


def test_show_with_the_demo_overlay(capsys, tmp_path):
    rc, out, _ = run_main(capsys, "--workspace", str(tmp_path), "config", "show", "v2", "--tiny", "--json")
    assert rc == 0
    payload = json.loads(out)
    assert payload["training"]["iters"] == 150 and payload["model"]["path"] == ".farense/tiny/model"
    assert payload["fingerprint"] == load_config("v2", overlays=["tiny"]).fingerprint
    rc, out2, _ = run_main(capsys, "config", "show", "v2", "--overlay", "tiny", "--json")
    assert json.loads(out2) == payload


def test_show_as_a_real_command():
    rc, out, err, _ = run_cli("config", "show", "v2")
    assert rc == 0, err
    assert f"# training fingerprint: {load_config(CONFIGS / 'v2.toml').fingerprint}" in out
    assert "rank = 6" in out


# --------------------------------------------------------------------------- diff


def test_diff_prints_exactly_what_differs(capsys):
    rc, out, _ = run_main(capsys, "config", "diff", "v1", "v2")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "# v1 -> v2" and lines[1] == "key\tv1\tv2"
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in lines[2:-1]}
    assert set(rows) == V1_V2_KEYS
    assert rows["lora.rank"] == ["8", "6"] and rows["training.learning_rate"] == ["0.0005", "0.0002"]
    v1, v2 = load_config("v1"), load_config("v2")
    assert lines[-1] == f"training fingerprint: {v1.fingerprint} != {v2.fingerprint}"


def test_diff_json(capsys):
    rc, out, _ = run_main(capsys, "config", "diff", "v1", "v2", "--json")
    assert rc == 0
    rows = {r["key"]: (r["a"], r["b"]) for r in json.loads(out)}
    assert set(rows) == V1_V2_KEYS
    assert rows["early_stopping.patience"] == (0, 5) and rows["training.batch_size"] == (4, 2)


def test_diff_of_identical_configs(capsys):
    rc, out, _ = run_main(capsys, "config", "diff", "v2", "v2")
    assert rc == 0 and out.strip() == "v2 and v2 are identical"


def test_diff_under_an_overlay_shows_the_same_changes(capsys):
    rc, out, _ = run_main(capsys, "config", "diff", "v1", "v2", "--tiny", "--json")
    assert rc == 0 and {r["key"] for r in json.loads(out)} == V1_V2_KEYS


# --------------------------------------------------------------------------- check: good input


def test_check_accepts_a_good_config(capsys, write_config):
    path = write_config()
    rc, out, err = run_main(capsys, "config", "check", str(path))
    assert rc == 0, err
    assert "train       8 examples  format=chat" in out
    assert "valid       4 examples" in out and "test        4 examples" in out
    assert f"exp: config, model path and data are valid (fingerprint {load_config(path).fingerprint})" in out


def test_check_as_a_real_command_loads_nothing_heavy(write_config):
    """The whole `config check` path, through cli.main, imports neither MLX nor mlx-lm."""
    path = write_config()
    code = textwrap.dedent(f"""
        import sys
        from farense.cli import main
        rc = main(["config", "check", {str(path)!r}])
        heavy = [m for m in ("mlx.core", "mlx_lm") if m in sys.modules]
        assert rc == 0 and not heavy, (rc, heavy)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- check: every bad-input case


def _cfg(overrides):
    return lambda write_config, data_dir, model_dir, tmp_path: write_config(overrides)


def _data(split: str, rows: list):
    def setup(write_config, data_dir, model_dir, tmp_path):
        (data_dir / f"{split}.jsonl").write_text("".join(r + "\n" for r in rows))
        return write_config()
    return setup


def _missing_model(write_config, data_dir, model_dir, tmp_path):
    return write_config({"model": {"path": str(tmp_path / "no-such-model")}})


def _missing_data_file(write_config, data_dir, model_dir, tmp_path):
    (data_dir / "train.jsonl").unlink()
    return write_config()


def _toml_syntax(write_config, data_dir, model_dir, tmp_path):
    return write_config(raw='name = "x"\n[lora]\nrank = = 8\n')


def _missing_parent(write_config, data_dir, model_dir, tmp_path):
    return write_config(raw='extends = "v0.toml"\n')


CHAT = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'

# (id, setup -> config path, which file the message must name: "config" or a data split, expected parts)
BAD_INPUT = [
    ("unknown-key", _cfg({"lora": {"rnak": 4}}), "config", ["lora.rnak: unknown key", "did you mean 'rank'"]),
    ("unknown-section", _cfg({"trainig": {"seed": 1}}), "config", ["trainig: unknown key", "did you mean 'training'"]),
    ("wrong-type", _cfg({"training": {"batch_size": "4"}}), "config",
     ["training.batch_size", "expected an integer, got str '4'"]),
    ("rank-0", _cfg({"lora": {"rank": 0}}), "config", ["lora.rank", "expected an integer >= 1, got 0"]),
    ("negative-lr", _cfg({"training": {"learning_rate": -5e-4}}), "config",
     ["training.learning_rate", "expected a number > 0, got -0.0005"]),
    ("dropout-1.5", _cfg({"lora": {"dropout": 1.5}}), "config", ["lora.dropout", "expected 0 <= dropout < 1, got 1.5"]),
    ("keep-last-0", _cfg({"checkpoint": {"keep_last": 0}}), "config", ["checkpoint.keep_last", "expected an integer >= 1"]),
    ("bad-size", _cfg({"disk": {"low_free": "20 gigs"}}), "config", ["disk.low_free", "expected a size such as 20GB"]),
    ("toml-syntax", _toml_syntax, "config", ["TOML syntax error", "line 3"]),
    ("missing-parent", _missing_parent, "config", ["extends: parent config 'v0.toml' not found"]),
    ("missing-model-dir", _missing_model, "config", ["model.path: model directory not found", "no-such-model"]),
    ("missing-data-file", _missing_data_file, "config", ["train.jsonl not found", "the train split is required"]),
    ("batch-not-dividing-work", _cfg({"training": {"batch_size": 16}}), "train",
     ["train.jsonl: 8 examples cannot fill one batch of training.batch_size=16", "expected at least 16 examples"]),
    ("malformed-json", _data("train", [CHAT, CHAT, '{"messages": ', CHAT, CHAT, CHAT, CHAT]), "train",
     ["train.jsonl:3: malformed JSON"]),
    ("missing-fields", _data("valid", [CHAT, '{"question": "q"}', CHAT, CHAT, CHAT]), "valid",
     ["valid.jsonl:2: missing fields: expected 'messages', 'prompt'+'completion' or 'text', got question"]),
    ("last-not-assistant", _data("valid", [CHAT] * 4 + ['{"messages": [{"role": "user", "content": "q"}]}']), "valid",
     ["valid.jsonl:5: the last message must be the assistant's answer"]),
    ("empty-split", _data("valid", []), "valid", ["valid.jsonl: the valid split is empty"]),
]


def _expect_refusal(rc: int, out: str, err: str, path: Path, names: str, data_dir: Path, expected: list[str]) -> None:
    assert rc == 2, (rc, out, err)
    assert out == ""  # nothing was reported as checked
    assert err.startswith("farense: error: ") and err.count("farense: error") == 1
    named = str(path) if names == "config" else str(data_dir / f"{names}.jsonl")
    assert named in err or str(Path(named).resolve()) in err, err
    for part in expected:
        assert part in err, err


@pytest.mark.parametrize("case_id,setup,names,expected", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_check_refuses_bad_input_in_process(capsys, write_config, data_dir, model_dir, tmp_path, case_id, setup, names, expected):
    path = setup(write_config, data_dir, model_dir, tmp_path)
    rc, out, err = run_main(capsys, "config", "check", str(path))
    _expect_refusal(rc, out, err, path, names, data_dir, expected)


@pytest.mark.parametrize("case_id,setup,names,expected", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_check_refuses_bad_input_as_a_real_command(write_config, data_dir, model_dir, tmp_path, case_id, setup, names, expected):
    path = setup(write_config, data_dir, model_dir, tmp_path)
    rc, out, err, elapsed = run_cli("config", "check", str(path), cwd=tmp_path)
    _expect_refusal(rc, out, err, path, names, data_dir, expected)
    assert elapsed < 10  # fails before anything heavy is loaded (the no-MLX import is asserted above)


def test_unknown_config_name(capsys):
    rc, out, err = run_main(capsys, "config", "check", "v2x")
    assert rc == 2 and "no config named 'v2x'" in err and "did you mean 'v2'" in err


def test_missing_demo_model_names_the_command_that_builds_it(capsys, tmp_path):
    rc, out, err = run_main(capsys, "--workspace", str(tmp_path), "config", "check", "v2", "--tiny")
    assert rc == 2
    assert f"model.path: model directory not found: {tmp_path.resolve() / '.farense/tiny/model'}" in err
    assert "farense demo init" in err and "data.dir: directory not found" in err
