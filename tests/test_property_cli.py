"""Property: no bad input ends in a traceback (issue 13). Hypothesis mutates configs, data files and a
run's files (wrong types, NaN/inf, huge integers, bad UTF-8, a BOM, torn and non-object JSON lines,
path tricks such as `..`, `/` and `.`) and runs the real `farense` command on them. Every case either
works or ends with one clear `farense: ...` line and an exit code farense documents (outcome.ExitCode);
no exception escapes `farense.cli.main`; nothing outside the run's own directory changes (the
workspace's paths, sizes and mtimes are compared before and after).

In-process through `farense.cli.main` (a process start costs a second), a few cases as real processes.
Bounded: max_examples per property, no deadline; the module takes about a minute on 2 cores.
FARENSE_PROPERTY_SCALE=20 multiplies the examples for a longer search.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import orjson
import pytest
import tomli_w
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from test_decision import make_fake_run
from training_fixtures import farense_env

from farense.cli import main
from farense.codes import ExitCode
from farense.config import SECTIONS, load_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
DOCUMENTED = {int(c) for c in ExitCode}
SCALE = int(os.environ.get("FARENSE_PROPERTY_SCALE", "1"))  # e.g. 20 for a longer search than the suite's
# No shrinking: a failure prints the example that failed at once, instead of minutes spent minimising it.
PROPERTY = settings(deadline=None, database=None, print_blob=True, phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

pytestmark = pytest.mark.timeout(600)

# --------------------------------------------------------------------------- running and judging


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """`farense ARGV` in this process; an exception escaping main is the traceback a user would see."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's usage errors
            rc = int(e.code or 0)
    return rc, out.getvalue(), err.getvalue()


def assert_clear(rc: int, err: str, *, case: Any) -> None:
    """Works, or one clear `farense:` line (a gathered error may list its problems below it) and a documented code."""
    assert "Traceback (most recent call last)" not in err, (case, err)
    assert rc in DOCUMENTED, (case, rc, err)
    if rc != 0:
        lines = [ln for ln in err.splitlines() if ln.startswith("farense:")]
        assert len(lines) == 1, (case, err)
        assert lines[0].split(":", 2)[-1].strip(), (case, err)


def snapshot(root: Path) -> dict[str, tuple[int, int] | str]:
    """Every path under root: files and links with (size, mtime_ns), directories by name."""
    out: dict[str, tuple[int, int] | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st_ = os.lstat(p)
            rel = str(p.relative_to(root))
            out[rel] = "dir" if p.is_dir() and not p.is_symlink() else (st_.st_size, st_.st_mtime_ns)
    return out


def changed_outside(before: dict, after: dict, inside: Path | None, root: Path) -> list[str]:
    """Paths added, removed or modified outside `inside` (the run's own directory)."""
    own = str(inside.relative_to(root)) if inside is not None else None

    def outside(rel: str) -> bool:
        return own is None or not (rel == own or rel.startswith(own + os.sep))

    return sorted(rel for rel in set(before) | set(after) if outside(rel) and before.get(rel) != after.get(rel))


def check_case(ws: Path, argv: list[str], case: Any, *, run_dir: Path | None = None) -> tuple[int, str]:
    before = snapshot(ws)
    rc, out, err = run_main(argv)
    assert_clear(rc, err, case=case)
    assert not changed_outside(before, snapshot(ws), run_dir, ws), (case, changed_outside(before, snapshot(ws), run_dir, ws))
    return rc, err


# --------------------------------------------------------------------------- hostile values

NAME_TRICKS = ["..", ".", "/", "../..", "../../etc", "a/b", "/tmp", "~", "~root", " ", "", "nul\x00byte", "é",
               "-", "--help", "a" * 300, "runs", "production", ".farense", "\\", "C:\\x"]
NUMBER_TRICKS = [math.nan, math.inf, -math.inf, 2**64, -(2**64), 2**63, 2**63 - 1, 10**30, 1e308, 5e-324, -0.0, 0, -1]
scalars = st.one_of(
    st.sampled_from(NUMBER_TRICKS), st.sampled_from(NAME_TRICKS), st.integers(), st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.datetimes(min_value=datetime(1, 1, 2)),
)
toml_values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=4), scalars, max_size=2))
FIELDS = [(sec, f) for sec, cls in SECTIONS.items() for f in cls.__dataclass_fields__]
PATH_KEYS = [("", "extends"), ("", "name"), ("model", "path"), ("data", "dir"), ("output", "runs_dir"),
             ("output", "production_dir"), ("output", "run_name")]
keys = st.one_of(st.sampled_from(FIELDS), st.sampled_from([("", "name"), ("", "extends"), ("", "description"),
                                                          ("lora", "alpha"), ("bogus", "key"), ("", "bogus")]))

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=10),
                         st.sampled_from(NAME_TRICKS))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=8)


def _byte_mutation(data: bytes, kind: str, at: int) -> bytes:
    at = at % (len(data) + 1)
    return {
        "none": data,
        "bom": b"\xef\xbb\xbf" + data,
        "bad-utf8": data[:at] + b"\xff\xfe\xc3" + data[at:],
        "torn": data[:at],
        "nul": data[:at] + b"\x00" + data[at:],
        "garbage": data + b"\n\x80garbage = [\n",
    }[kind]


byte_mutations = st.tuples(st.sampled_from(["none", "none", "bom", "bad-utf8", "torn", "nul", "garbage"]),
                           st.integers(min_value=0, max_value=10_000))


def _json_line(kind: str, value: Any) -> bytes:
    """One hostile JSON-lines line: non-object JSON, a torn object, NaN, a row with wrong types."""
    if kind == "value":
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS) if _jsonable(value) else b"null"
    if kind == "torn":
        return orjson.dumps({"step": 3, "train_loss": 1.0})[:7]
    if kind == "nan":
        return b'{"step": 4, "train_loss": NaN, "val_loss": Infinity}'
    if kind == "typed":
        return orjson.dumps({"step": value, "train_loss": value, "val_loss": value, "messages": value}
                            if _jsonable(value) else {"step": "abc"})
    return b""


def _jsonable(value: Any) -> bool:
    try:
        orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
        return True
    except (TypeError, orjson.JSONEncodeError):
        return False


json_lines = st.lists(st.tuples(st.sampled_from(["value", "torn", "nan", "typed", "empty"]), json_values),
                      min_size=1, max_size=4)


# --------------------------------------------------------------------------- a workspace


def _chat(i: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"pergunta {i}?"},
                         {"role": "assistant", "content": f"resposta {i}."}]}


def _write_data(d: Path, n: int = 8) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split, rng in (("train", range(n)), ("valid", range(n, n + 4)), ("test", range(n + 4, n + 8))):
        (d / f"{split}.jsonl").write_bytes(b"".join(orjson.dumps(_chat(i)) + b"\n" for i in rng))
    return d


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace: a model directory that passes the path checks, chat data, runs/ and production/."""
    ws = tmp_path_factory.mktemp("property-ws")
    model = ws / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 4}')
    (model / "model.safetensors").write_bytes(b"\0" * 8)
    _write_data(ws / "data")
    (ws / "runs").mkdir()
    (ws / "production").mkdir()
    (ws / "cases").mkdir()
    return ws


@pytest.fixture(autouse=True)
def _env(monkeypatch, ws):
    monkeypatch.setenv("FARENSE_CONFIG_DIR", str(CONFIGS))
    monkeypatch.setenv("FARENSE_WORKSPACE", str(ws))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ws)


def base_config(ws: Path) -> dict[str, Any]:
    return {"extends": str(CONFIGS / "v1.toml"), "name": "prop", "model": {"path": str(ws / "model")},
            "data": {"dir": str(ws / "data")}, "lora": {"num_layers": 2},
            "training": {"iters": 8, "epochs": 0, "batch_size": 2, "grad_accumulation": 1},
            "validation": {"every_steps": 4}, "checkpoint": {"every_steps": 4}}


_counter = iter(range(10**9))


def case_dir(ws: Path) -> Path:
    d = ws / "cases" / f"c{next(_counter):06d}"
    d.mkdir()
    return d


def write_config(path: Path, doc: dict[str, Any], mutation: tuple[str, int]) -> Path:
    try:
        text = tomli_w.dumps(doc).encode()
    except (TypeError, ValueError):  # a value TOML cannot hold (tomli_w refuses it): as a string then
        text = tomli_w.dumps({**doc, **{k: repr(v) for k, v in doc.items() if not isinstance(v, dict)}}).encode()
    path.write_bytes(_byte_mutation(text, *mutation))
    return path


# --------------------------------------------------------------------------- properties


edits = st.lists(st.one_of(st.tuples(keys, toml_values), st.tuples(st.sampled_from(PATH_KEYS), st.sampled_from(NAME_TRICKS))),
                 min_size=1, max_size=3)


@settings(PROPERTY, max_examples=300 * SCALE)
@given(edits=edits, mutation=byte_mutations)
@example(edits=[(("", "extends"), "/")], mutation=("none", 0))  # found by this test: with_suffix on "/"
@example(edits=[(("lora", "scale"), math.nan)], mutation=("bom", 0))
def test_config_check_never_tracebacks(ws, edits, mutation):
    doc = base_config(ws)
    for (sec, key), value in edits:
        if sec:
            if not isinstance(doc.get(sec), dict):
                doc[sec] = {}
            doc[sec][key] = value
        else:
            doc[key] = value
    d = case_dir(ws)
    path = write_config(d / "exp.toml", doc, mutation)
    try:
        for argv in (["config", "check", str(path)], ["config", "show", str(path)]):
            check_case(ws, argv, (edits, mutation, argv))
    finally:
        shutil.rmtree(d)


@settings(PROPERTY, max_examples=200 * SCALE)
@given(split=st.sampled_from(["train", "valid", "test"]), lines=json_lines, at=st.integers(0, 12),
       mutation=byte_mutations)
def test_data_validation_never_tracebacks(ws, split, lines, at, mutation):
    d = _write_data(case_dir(ws) / "data")
    good = (d / f"{split}.jsonl").read_bytes().splitlines()
    at = at % (len(good) + 1)
    bad = [_json_line(kind, value) for kind, value in lines]
    (d / f"{split}.jsonl").write_bytes(_byte_mutation(b"\n".join(good[:at] + bad + good[at:]) + b"\n", *mutation))
    doc = base_config(ws)
    doc["data"]["dir"] = str(d)
    path = write_config(d.parent / "exp.toml", doc, ("none", 0))
    try:
        check_case(ws, ["config", "check", str(path)], (split, lines, at, mutation))
    finally:
        shutil.rmtree(d.parent)


RUN_FILES = ["metrics.jsonl", "training_summary.json", "run_state.json", "config.json",
             "evaluation/evaluation_report.json", "adapters/adapter_config.json"]


@pytest.fixture(scope="module")
def template_run(ws) -> Path:
    """A finished, evaluated run (its files as the trainer and the evaluation write them)."""
    return make_fake_run(ws / "templates", "tmpl", config="v2")


def _mutated_run(ws: Path, template: Path, target: str, lines: list, mutation: tuple[str, int]) -> Path:
    run = ws / "runs" / f"r{next(_counter):06d}"
    shutil.copytree(template, run)
    path = run / target
    if target.endswith(".jsonl"):
        data = path.read_bytes() + b"".join(_json_line(k, v) + b"\n" for k, v in lines)
    else:
        kind, value = lines[0]
        typed = _retyped(path, value) if kind == "typed" else None
        data = _json_line(kind, value) if kind != "typed" or not _jsonable(typed) else orjson.dumps(typed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_byte_mutation(data, *mutation))
    return run


def _retyped(path: Path, value: Any) -> Any:
    """The file's JSON object with every top-level value replaced by `value` (wrong types everywhere)."""
    try:
        obj = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return value
    return {k: value for k in obj} if isinstance(obj, dict) and _jsonable(value) else value


@settings(PROPERTY, max_examples=100 * SCALE)
@given(target=st.sampled_from(RUN_FILES), lines=json_lines, mutation=byte_mutations,
       command=st.sampled_from(["status", "plot", "compare", "evaluate"]))
def test_commands_on_a_damaged_run_never_traceback(ws, template_run, target, lines, mutation, command):
    run = _mutated_run(ws, template_run, target, lines, mutation)
    argv = {
        "status": ["status", "--runs-dir", str(ws / "runs"), "--production-dir", str(ws / "production")],
        "plot": ["plot", str(run), "--out", str(run / "plots" / "loss.png")],
        "compare": ["compare", str(template_run), str(run)],
        "evaluate": ["evaluate", str(run)],  # the run's model is a hub id: offline, it stops at the load at the latest
    }[command]
    try:
        check_case(ws, argv, (target, lines, mutation, command), run_dir=run)
    finally:
        shutil.rmtree(run)


def test_a_few_cases_as_real_processes(ws, tmp_path):
    """The same judgement on the real command's output: a BOM, NaN, 2**64, a non-object data line."""
    data = _write_data(tmp_path / "data")
    (data / "train.jsonl").write_bytes((data / "train.jsonl").read_bytes() + b"[1, 2, 3]\n")
    cases = {"bom": ({}, b"\xef\xbb\xbf"), "nan": ({"lora": {"scale": math.nan}}, b""),
             "huge": ({"training": {"seed": 2**64}}, b""), "data": ({"data": {"dir": str(data)}}, b"")}
    for name, (edit, prefix) in cases.items():
        doc = base_config(ws)
        for sec, values in edit.items():
            doc[sec] = {**doc.get(sec, {}), **values}
        p = tmp_path / f"{name}.toml"
        p.write_bytes(prefix + tomli_w.dumps(doc).encode())
        before = snapshot(ws)
        r = subprocess.run([sys.executable, "-m", "farense", "config", "check", str(p)], cwd=ws, env=farense_env(),
                           capture_output=True, text=True, timeout=60)
        assert_clear(r.returncode, r.stderr, case=name)
        assert r.returncode == ExitCode.BAD_INPUT, (name, r.stderr)
        assert snapshot(ws) == before


@settings(PROPERTY, max_examples=4 * SCALE)
@given(run_name=st.sampled_from(["ok", "..", ".", "/", "a/b", "nul\x00", "runs", "-", "x" * 300]),
       lines=st.one_of(st.just([]), json_lines))
@example(run_name="..", lines=[])
def test_train_as_a_real_process_never_tracebacks(ws, demo_dir, run_name, lines):
    """`farense train` on the tiny model: a run name with a path trick or a damaged data line is refused
    (or the 2-step run works); whatever happens, only the run's own directory changes."""
    d = _write_data(case_dir(ws) / "data")
    (d / "train.jsonl").write_bytes((d / "train.jsonl").read_bytes() + b"".join(_json_line(k, v) + b"\n" for k, v in lines))
    cfg = load_config("v2", overlays=["tiny"], workspace=ws)
    doc = {**cfg.to_dict(), "name": "prop"}
    doc["model"]["path"], doc["data"]["dir"] = str(demo_dir / "model"), str(d)
    doc["training"].update(iters=2, warmup_steps=0, max_seq_length=64, batch_size=2, grad_accumulation=1)
    doc["validation"].update(every_steps=2, batches=1)
    doc["checkpoint"]["every_steps"] = 2
    doc["output"].update(runs_dir=str(ws / "runs"), production_dir=str(ws / "production"), run_name=run_name)
    path = write_config(d.parent / "exp.toml", doc, ("none", 0))
    plain = run_name not in ("", ".", "..") and "/" not in run_name and "\x00" not in run_name and len(run_name) < 100
    run_dir = ws / "runs" / run_name if plain else None  # the only place allowed to change
    before = snapshot(ws)
    try:
        r = subprocess.run([sys.executable, "-m", "farense", "--workspace", str(ws), "train", str(path), "--no-progress"],
                           cwd=ws, env=farense_env(), capture_output=True, text=True, timeout=180)
        assert_clear(r.returncode, r.stderr, case=(run_name, lines))
        assert not changed_outside(before, snapshot(ws), run_dir, ws), (run_name, lines, r.stderr)
    finally:
        shutil.rmtree(d.parent)
        if run_dir is not None and run_dir.is_dir():
            shutil.rmtree(run_dir)
