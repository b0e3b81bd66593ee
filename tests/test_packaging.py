"""First impressions (issue 13, item 12): the README's commands print no noise and the packaging
metadata builds without deprecation warnings or pointers to files that are not in the repository."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_interpreter_probe_is_quiet_about_pyenv_shims(tmp_path):
    """A pyenv shim for a Python that is not selected exists on PATH but prints 'command not found'."""
    shims = tmp_path / "shims"
    shims.mkdir()
    for name in ("python3.13", "python3.12"):
        shim = shims / name
        shim.write_text(f"#!/bin/sh\necho 'pyenv: {name}: command not found' >&2\nexit 127\n")
        shim.chmod(0o755)
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "_venv.sh", root / "scripts" / "_venv.sh")
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    # A virtual environment that is already installed: nothing is created or installed, only probed.
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "python").symlink_to(sys.executable)
    stamp = subprocess.run(["bash", "-c", "(cat pyproject.toml; echo '') | cksum"], cwd=root, capture_output=True,
                           text=True, check=True).stdout
    (root / ".venv" / ".farense-installed").write_text(stamp)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = f"{shims}:{env['PATH']}"
    r = subprocess.run(["bash", "-c", "source scripts/_venv.sh && ensure_venv .venv ''"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr


def test_the_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT"  # a table is deprecated by setuptools (PEP 639)
    requires = " ".join(meta["build-system"]["requires"])
    m = re.search(r"setuptools>=(\d+)", requires)
    assert m and int(m.group(1)) >= 77, requires


def test_every_file_pyproject_points_readers_at_is_in_the_repository():
    text = (REPO / "pyproject.toml").read_text()
    for ref in re.findall(r"[\w./-]+\.(?:md|txt|rst)\b", text):
        assert (REPO / ref).exists(), f"pyproject.toml points at {ref}, which is not in the repository"
    assert "PREFECT_NOTES" not in text
