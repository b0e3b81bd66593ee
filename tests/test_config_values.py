"""Issue 13, item 8: every number in a config is finite and fits 64 bits; a config file that cannot be
read as UTF-8 TOML (a BOM, other bytes, a directory, a symlink loop) is a clear config error, never a
traceback. Run through `farense config check` in-process, as a user would meet it."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from farense.cli import main
from farense.config import SECTIONS, Size

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("FARENSE_CONFIG_DIR", str(CONFIGS))
    monkeypatch.setenv("FARENSE_WORKSPACE", str(tmp_path))


def _fields_of(tp: type) -> list[str]:
    """Every `section.key` whose declared type is `tp` (read from the config's own declarations)."""
    out = []
    for sec, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        out += [f"{sec}.{f.name}" for f in dataclasses.fields(cls) if hints[f.name] is tp]
    return out


FLOAT_FIELDS = _fields_of(float)
INT_FIELDS = _fields_of(int)


def check(capsys, path: Path) -> tuple[int, str, str]:
    rc = main(["config", "check", str(path)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def _with(write_config, key: str, literal: str) -> Path:
    """A valid config whose `key` is set to a raw TOML literal (nan, inf, a huge integer)."""
    path = write_config()
    sec, name = key.split(".")
    path.write_text(path.read_text() + f"\n[{sec}]\n{name} = {literal}\n" if f"[{sec}]" not in path.read_text()
                    else path.read_text().replace(f"[{sec}]\n", f"[{sec}]\n{name} = {literal}\n", 1))
    return path


def test_the_declarations_have_the_fields_the_issue_names():
    for key in ("lora.scale", "training.min_learning_rate", "training.weight_decay", "early_stopping.min_delta",
                "disk.check_interval_seconds", "decision.max_gap"):
        assert key in FLOAT_FIELDS


@pytest.mark.parametrize("literal", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_FIELDS)
def test_nan_and_infinity_are_refused_for_every_float_field(capsys, write_config, key, literal):
    rc, out, err = check(capsys, _with(write_config, key, literal))
    assert rc == 2 and out == "", err
    assert f"{key}: expected a finite number (not nan or inf), got {literal.lstrip('+')}" in err, err
    assert err.count("\n") == 1  # one problem, one line: no joint rule compares against NaN


@pytest.mark.parametrize("literal", [str(2**64), str(2**63), str(-(2**63) - 1), "1" + "0" * 40])
@pytest.mark.parametrize("key", INT_FIELDS)
def test_an_integer_beyond_64_bits_is_a_config_error(capsys, write_config, key, literal):
    rc, out, err = check(capsys, _with(write_config, key, literal))
    assert rc == 2 and out == "", err
    assert f"{key}: expected an integer from -9223372036854775808 to 9223372036854775807 (64 bits)" in err, err


@pytest.mark.parametrize("key", FLOAT_FIELDS[:3])
def test_an_integer_too_large_for_a_float_is_a_config_error(capsys, write_config, key):
    rc, out, err = check(capsys, _with(write_config, key, "1" + "0" * 400))
    assert rc == 2 and f"{key}: expected a finite number" in err, err


@pytest.mark.parametrize("literal", [f'"{"9" * 400}PB"', str(2**64)])
def test_a_size_too_large_is_a_config_error(capsys, write_config, literal):
    assert "reserve" in [f.name for f in dataclasses.fields(SECTIONS["disk"])]
    assert typing.get_type_hints(SECTIONS["disk"])["reserve"] is Size
    rc, out, err = check(capsys, _with(write_config, "disk.reserve", literal))
    assert rc == 2 and "disk.reserve: expected" in err, err


def test_a_bom_is_named(capsys, tmp_path, write_config):
    path = write_config()
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    rc, out, err = check(capsys, path)
    assert rc == 2 and "starts with a UTF-8 byte-order mark (BOM); save it without one" in err, err
    assert "Invalid statement" not in err and str(path) in err


def test_a_config_that_is_not_utf8(capsys, write_config):
    path = write_config()
    path.write_bytes(path.read_bytes() + b'\ndescription = "caf\xe9"\n')
    rc, out, err = check(capsys, path)
    assert rc == 2 and "not UTF-8 text (invalid byte 0xe9 on line" in err and str(path) in err, err


def test_a_directory_given_as_the_config(capsys, tmp_path):
    (tmp_path / "exp.toml").mkdir()
    rc, out, err = check(capsys, tmp_path / "exp.toml")
    assert rc == 2 and "is a directory; expected a TOML config file" in err, err
    rc, out, err = check(capsys, tmp_path)  # a directory path without .toml
    assert rc == 2 and "is a directory" in err, err


def test_a_symlink_loop_and_a_dangling_symlink(capsys, tmp_path):
    (tmp_path / "a.toml").symlink_to("b.toml")
    (tmp_path / "b.toml").symlink_to("a.toml")
    rc, out, err = check(capsys, tmp_path / "a.toml")
    assert rc == 2 and "cannot follow" in err and "a.toml" in err, err
    (tmp_path / "d.toml").symlink_to("missing.toml")
    rc, out, err = check(capsys, tmp_path / "d.toml")
    assert rc == 2 and "file not found" in err, err


def test_a_parent_that_is_not_readable_names_the_parent(capsys, tmp_path, write_config):
    parent = tmp_path / "parent.toml"
    parent.write_bytes(b"\xef\xbb\xbf[lora]\nrank = 4\n")
    path = write_config()
    path.write_text(path.read_text().replace(str(CONFIGS / "v1.toml"), str(parent)))
    rc, out, err = check(capsys, path)
    assert rc == 2 and str(parent) in err and "byte-order mark" in err, err


def test_a_run_name_too_long_for_a_directory_is_a_config_error(capsys, write_config):
    """Found by the property test: a 300-character run name failed with ENAMETOOLONG once training began."""
    rc, out, err = check(capsys, write_config({"output": {"run_name": "x" * 300}}))
    assert rc == 2 and "output.run_name: expected at most 100 characters (a directory name), got 300" in err, err
    rc, out, err = check(capsys, write_config({"output": {"run_name": "x" * 100}}))
    assert "output.run_name" not in err, err
