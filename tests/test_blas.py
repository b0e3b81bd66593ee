"""farense.model.blas: MLX's CPU backend on OpenBLAS through the shim, and every way back to the reference BLAS.

Each case runs in a fresh interpreter, since a BLAS can only be chosen before mlx is imported.
No timings here: bench/bench_blas.py measures the speed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from farense.model.blas import ENV_LIB, ENV_MODE, SHIM_NAME, BlasInfo, thread_env

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"),
    reason="the OpenBLAS route is for Linux x86_64/aarch64 (macOS uses Accelerate)",
)
needs_cc = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler for the shim")

# Choose the BLAS, print the one line if slow, then multiply in fp32, fp64 and complex64 with MLX
# and report what happened as one JSON line.
PROBE = """
import dataclasses, json, sys
{before}
from farense.model import blas
info = blas.ensure_fast_blas()
blas.announce(info)
import mlx.core as mx
import numpy as np
rng = np.random.default_rng(0)
a, b = rng.standard_normal((96, 80)), rng.standard_normal((64, 80))
close = {{}}
for name, dtype in (("float32", np.float32), ("float64", np.float64), ("complex64", np.complex64)):
    x, y = (a * (1 + 1j) if dtype is np.complex64 else a).astype(dtype), b.astype(dtype)
    got = np.array(mx.matmul(mx.array(x), mx.array(y).T, stream=mx.cpu))
    close[name] = bool(np.allclose(got, x.astype(np.complex128) @ y.T.astype(np.complex128), rtol=1e-4, atol=1e-4))
maps = open("/proc/self/maps").read()
print(json.dumps({{"info": dataclasses.asdict(info), "again": dataclasses.asdict(blas.ensure_fast_blas()),
                  "describe": blas.describe_blas(), "calls": blas.shim_calls(), "close": close,
                  "shim_mapped": "{shim}" in maps, "openblas_mapped": "scipy_openblas32" in maps}}))
"""


def probe(cache: Path, before: str = "", **env: str) -> tuple[dict[str, Any], list[str]]:
    """Run PROBE in a fresh interpreter; its JSON report and its stderr lines."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FARENSE_BLAS")}
    code = PROBE.format(before=before, shim=SHIM_NAME)
    proc = subprocess.run([sys.executable, "-c", code], env={**base, "XDG_CACHE_HOME": str(cache), **env},
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr.splitlines()


def assert_reference(report: dict[str, Any], reason: str) -> None:
    """On the reference BLAS for `reason`, and MLX still multiplies right."""
    assert report["info"]["fast"] is False and report["info"]["name"] == "reference"
    assert reason in report["info"]["reason"]
    assert report["describe"].startswith("BLAS: reference (slow): ")
    assert report["calls"] is None and not report["shim_mapped"]
    assert all(report["close"].values()), report["close"]


def slow_lines(stderr: list[str]) -> list[str]:
    return [line for line in stderr if "slow reference BLAS" in line]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One shim cache for the module: the first probe builds the shim, the others reuse it."""
    return tmp_path_factory.mktemp("cache")


@needs_cc
def test_mlx_multiplies_through_the_shim_and_matches_numpy(cache: Path):
    report, stderr = probe(cache)
    info = report["info"]
    assert info["fast"] is True and info["name"] == "OpenBLAS", info
    assert info["source"] == "scipy-openblas32" and info["via"] == "farense shim"
    assert info["version"] and info["detail"].startswith("OpenBLAS ")
    assert Path(info["path"]).name.startswith("libscipy_openblas")
    assert info["threads"] >= 1
    assert report["describe"].startswith(f"BLAS: OpenBLAS {info['version']} (scipy-openblas32) via farense shim, ")
    assert all(report["close"].values()), report["close"]
    # libmlx's cblas_sgemm/dgemm/cgemm bound to the shim: it counted MLX's three products.
    assert report["calls"] == 3
    assert report["shim_mapped"] and report["openblas_mapped"]
    assert report["again"] == info
    assert not slow_lines(stderr)
    assert list(cache.glob(f"farense/blas/*/{SHIM_NAME}"))


@needs_cc
def test_racing_first_uses_build_one_shim(tmp_path: Path):
    """Processes that start together with an empty cache all get the fast BLAS and leave one file."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FARENSE_BLAS")}
    code = "from farense.model import blas; print(blas.ensure_fast_blas().fast)"
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**base, "XDG_CACHE_HOME": str(tmp_path)},
                              cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    assert [p.communicate(timeout=120)[0].strip() for p in procs] == ["True"] * 3
    assert [p.name for p in tmp_path.glob("farense/blas/*/*")] == [SHIM_NAME]


def test_opting_out_keeps_the_reference_blas_quietly(cache: Path):
    report, stderr = probe(cache, **{ENV_MODE: "reference"})
    assert_reference(report, "FARENSE_BLAS=reference")
    assert not report["openblas_mapped"]
    assert not slow_lines(stderr)  # the user chose it: nothing to tell


def test_missing_library_falls_back_with_one_line(cache: Path, tmp_path: Path):
    missing = tmp_path / "nowhere" / "libopenblas.so.0"
    report, stderr = probe(cache, **{ENV_LIB: str(missing)})
    assert_reference(report, f"{ENV_LIB}={missing} does not exist")
    assert len(slow_lines(stderr)) == 1, stderr


def test_an_openblas_without_the_names_falls_back(cache: Path):
    """numpy's scipy-openblas64 (64-bit integers, names ending in 64_) is not one MLX can call."""
    import numpy

    wrong = sorted(Path(numpy.__file__).parent.parent.glob("numpy.libs/libscipy_openblas64_*.so"))
    if not wrong:
        pytest.skip(reason="this numpy does not bundle scipy-openblas64")
    report, stderr = probe(cache, **{ENV_LIB: str(wrong[0])})
    assert_reference(report, "exports neither cblas_sgemm nor scipy_cblas_sgemm")
    assert len(slow_lines(stderr)) == 1, stderr


@pytest.mark.parametrize("env", [{"CC": "/nonexistent/cc"}, {"CC": ""}], ids=["CC-missing", "no-cc-on-PATH"])
def test_no_compiler_falls_back_with_one_line(tmp_path: Path, env: dict[str, str]):
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    report, stderr = probe(tmp_path / "fresh-cache", PATH=str(empty_path), **env)
    assert_reference(report, "no C compiler to build the BLAS shim")
    assert "apt-get install gcc" in report["info"]["fix"]
    [line] = slow_lines(stderr)
    assert line.startswith("farense: MLX's CPU backend runs on the slow reference BLAS (no C compiler")


@needs_cc
def test_an_unwritable_cache_falls_back_with_one_line(tmp_path: Path):
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("")  # a file where the cache directory should be: unwritable even for root
    report, stderr = probe(not_a_dir)
    assert_reference(report, "the BLAS shim's cache")
    assert report["info"]["fix"] == "set XDG_CACHE_HOME to a writable directory"
    assert len(slow_lines(stderr)) == 1, stderr


def test_mlx_imported_first_is_too_late(cache: Path):
    report, stderr = probe(cache, before="import mlx.core")
    assert_reference(report, "mlx was imported before farense could load a faster BLAS")
    assert "ensure_fast_blas() before importing mlx" in report["info"]["fix"]
    assert len(slow_lines(stderr)) == 1


def test_the_line_is_printed_once_per_process_tree(tmp_path: Path):
    """`farense run` prints it; the trainer subprocess that the flow starts does not again."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FARENSE_BLAS")}
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-m', 'farense', '--help'], stdout=subprocess.DEVNULL)"
    code = f"from farense.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\nexec({child!r})"
    proc = subprocess.run([sys.executable, "-c", code], env={**base, ENV_LIB: str(tmp_path / "missing.so")},
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(slow_lines(proc.stderr.splitlines())) == 1, proc.stderr


@needs_cc
@pytest.mark.parametrize("entry", ["from farense.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
                                   "import tasks"], ids=["farense-command", "prefect-tasks"])
def test_entry_points_load_it_before_mlx(cache: Path, entry: str):
    """The farense command and the Prefect tasks' package (a deployment's flow process) load it first."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FARENSE_BLAS")}
    code = entry + "\nimport mlx.core as mx\nfrom farense.model import blas\nmx.eval(mx.ones((8, 8)) @ mx.ones((8, 8)))\nprint(blas.shim_calls())"
    proc = subprocess.run([sys.executable, "-c", code], env={**base, "XDG_CACHE_HOME": str(cache)},
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.splitlines()[-1]) >= 1


def test_descriptions():
    fast = BlasInfo(True, "OpenBLAS", version="0.3.30", source="scipy-openblas32", via="farense shim")
    assert fast.describe() == "BLAS: OpenBLAS 0.3.30 (scipy-openblas32) via farense shim" and fast.warning == ""
    assert BlasInfo(True, "OpenBLAS", version="0.3.21", source="FARENSE_BLAS_LIB", threads=2).describe() \
        == "BLAS: OpenBLAS 0.3.21 (FARENSE_BLAS_LIB), 2 threads"
    assert BlasInfo(True, "Accelerate", source="macOS", via="mlx").describe() == "BLAS: Accelerate (macOS) via mlx"
    slow = BlasInfo(False, "reference", reason="no C compiler", fix="install gcc")
    assert slow.describe() == "BLAS: reference (slow): no C compiler; install gcc"
    assert slow.warning == "farense: MLX's CPU backend runs on the slow reference BLAS (no C compiler); for a fast one: install gcc"
    assert BlasInfo(False, "reference", reason="FARENSE_BLAS=reference is set").warning == ""


def test_ranks_on_one_machine_share_its_cores():
    cores = len(os.sched_getaffinity(0))
    assert thread_env(1, {}) == {}
    assert thread_env(2, {}) == {"OPENBLAS_NUM_THREADS": str(max(1, cores // 2))}
    assert thread_env(4 * cores, {}) == {"OPENBLAS_NUM_THREADS": "1"}
    assert thread_env(2, {"OPENBLAS_NUM_THREADS": "3"}) == {}  # the user's choice stands
