"""Owns which BLAS MLX's CPU backend multiplies with: an optimized OpenBLAS loaded before mlx, or why not.

MLX's Linux CPU wheel links the reference BLAS (fp32 matmul ~6 GFLOP/s on a 2-core x86-64 box).
libmlx.so takes only cblas_sgemm, cblas_dgemm and cblas_cgemm from it, and the dynamic linker binds
them to the first library in the process's global namespace that exports them. So, before mlx.core
is imported, ensure_fast_blas() loads scipy-openblas32 (a farense dependency on Linux) with
RTLD_GLOBAL, then a few-line shim (farense/model/_blas_shim.c, compiled once with cc into the user's cache)
that exports the standard names and forwards them to scipy-openblas32's scipy_-prefixed ones.
bf16/fp16 and quantized matmuls on the CPU do not go through BLAS: train there in fp32.

OpenBLAS runs one thread per core unless OPENBLAS_NUM_THREADS says otherwise. On a machine whose
cores are busy with other work, its threads wait for each other and a product can end up slower
than the reference BLAS (bench/bench_blas.py shows both): there, set OPENBLAS_NUM_THREADS=1.
Ranks that farense launches on one machine share its cores that way (see thread_env).

Environment:
  FARENSE_BLAS=reference  keep MLX's bundled reference BLAS (opt out; default: auto)
  FARENSE_BLAS_LIB=PATH   use this OpenBLAS instead of scipy-openblas32's: one that exports the
                          standard cblas_* names is loaded as it is, one with scipy_ names via the shim
  CC                      the compiler for the shim (default: cc, gcc or clang on PATH)
  XDG_CACHE_HOME          the shim is cached in $XDG_CACHE_HOME/farense/blas/ (default ~/.cache)
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TextIO

ENV_MODE = "FARENSE_BLAS"
ENV_LIB = "FARENSE_BLAS_LIB"
ENV_NOTED = "FARENSE_BLAS_NOTED"  # set once the slow-BLAS line is printed, so child processes stay quiet
SHIM_SOURCE = Path(__file__).with_name("_blas_shim.c")
SHIM_NAME = "libfarense_cblas.so"
LINUX_MACHINES = ("x86_64", "aarch64")
COMPILE_TIMEOUT_S = 120

FIX_COMPILER = ("install a C compiler (e.g. `apt-get install gcc`) so that farense can build its BLAS shim, "
                f"or set {ENV_LIB} to an OpenBLAS with the standard cblas_* names "
                "(e.g. libopenblas.so.0 from `apt-get install libopenblas0`)")
FIX_PACKAGE = "`pip install scipy-openblas32` (a farense dependency on Linux: reinstalling farense brings it)"


@dataclass(frozen=True)
class BlasInfo:
    """Which BLAS MLX's CPU backend uses; when it is the slow reference one, why and how to fix it."""

    fast: bool
    name: str  # "OpenBLAS", "Accelerate" or "reference"
    version: str = ""  # e.g. "0.3.30", from the library's own config string
    path: str = ""  # the library file loaded
    source: str = ""  # where it came from: "scipy-openblas32", "FARENSE_BLAS_LIB", "macOS"
    via: str = ""  # how MLX reaches it: "farense shim", or "" when the library has the standard names
    detail: str = ""  # the library's config string (version, build options, CPU core type)
    threads: int = 0  # OpenBLAS's thread count (OPENBLAS_NUM_THREADS, default one per core)
    reason: str = ""  # why the reference BLAS is in use ("" when fast)
    fix: str = ""  # how to get a fast one ("" when fast or when there is nothing to do)

    def describe(self) -> str:
        """One line for a run's log."""
        if self.fast:
            version = f" {self.version}" if self.version else ""
            via = f" via {self.via}" if self.via else ""
            threads = f", {self.threads} thread{'s' if self.threads > 1 else ''}" if self.threads else ""
            return f"BLAS: {self.name}{version} ({self.source}){via}{threads}"
        return f"BLAS: reference (slow): {self.reason}" + (f"; {self.fix}" if self.fix else "")

    @property
    def warning(self) -> str:
        """The one line to print when a fast BLAS could be had but is not in use; else ""."""
        if self.fast or not self.fix:
            return ""
        return f"farense: MLX's CPU backend runs on the slow reference BLAS ({self.reason}); for a fast one: {self.fix}"


class _NoFastBlas(Exception):
    """A route to the fast BLAS failed; carries the reason and the fix for BlasInfo."""

    def __init__(self, reason: str, fix: str):
        super().__init__(reason, fix)
        self.reason, self.fix = reason, fix


_info: BlasInfo | None = None
_shim: ctypes.CDLL | None = None


def ensure_fast_blas() -> BlasInfo:
    """Load an optimized BLAS for MLX's CPU backend if one can be had; call before mlx is imported.

    Decided once per process: later calls return the first answer, also after mlx is imported.
    """
    global _info
    if _info is None:
        _info = _choose()
    return _info


def describe_blas() -> str:
    """One line for a run's log: which BLAS MLX's CPU backend uses, or why the slow one and the fix."""
    return ensure_fast_blas().describe()


def announce(info: BlasInfo, stream: TextIO | None = None) -> None:
    """Print the slow-BLAS line once per process tree (a trainer that a flow starts stays quiet)."""
    if info.warning and not os.environ.get(ENV_NOTED):
        print(info.warning, file=stream or sys.stderr, flush=True)
        os.environ[ENV_NOTED] = "1"


def thread_env(processes: int, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """OPENBLAS_NUM_THREADS for each of `processes` sharing this machine's cores, unless already set.

    With one thread per core each, they oversubscribe the cores and OpenBLAS's threads wait on each
    other (2 ranks on 2 cores: steps several times slower than one thread each).
    """
    if processes <= 1 or "OPENBLAS_NUM_THREADS" in environ:
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"OPENBLAS_NUM_THREADS": str(max(1, cores // processes))}


def shim_calls() -> int | None:
    """GEMMs forwarded by the shim in this process (None when it is not loaded): proof MLX uses it."""
    if _shim is None:
        return None
    return ctypes.c_ulong.in_dll(_shim, "farense_cblas_calls").value


def _choose() -> BlasInfo:
    if sys.platform == "darwin":
        return BlasInfo(True, "Accelerate", source="macOS", via="mlx")  # MLX links Accelerate there
    mode = os.environ.get(ENV_MODE, "").strip().lower() or "auto"
    if mode == "reference":
        return _reference(f"{ENV_MODE}=reference is set", "")
    if mode != "auto":
        return _reference(f"{ENV_MODE}={mode} is neither auto nor reference", f"unset {ENV_MODE}")
    if sys.platform != "linux" or platform.machine() not in LINUX_MACHINES:
        return _reference(f"farense knows no optimized BLAS for {sys.platform} {platform.machine()}", "")
    if "mlx.core" in sys.modules:
        return _reference("mlx was imported before farense could load a faster BLAS",
                          "call farense.blas.ensure_fast_blas() before importing mlx (the farense command does)")
    try:
        return _load_openblas()
    except _NoFastBlas as e:
        return _reference(e.reason, e.fix)


def _reference(reason: str, fix: str) -> BlasInfo:
    return BlasInfo(False, "reference", reason=reason, fix=fix)


def _load_openblas() -> BlasInfo:
    """Load OpenBLAS, and the shim when its names are prefixed, into the global namespace."""
    global _shim
    path, source = _find_openblas()
    lib = _load_global(path, f"point {ENV_LIB} at another OpenBLAS, or unset it" if source == ENV_LIB else FIX_PACKAGE)
    if hasattr(lib, "cblas_sgemm"):
        provider, via = lib, ""
    elif hasattr(lib, "scipy_cblas_sgemm"):
        shim = _shim_path()
        if not shim.is_file():
            _compile_shim(shim)
        provider, via = _load_global(shim, f"delete {shim.parent} so that farense builds it again"), "farense shim"
    else:
        raise _NoFastBlas(f"{path} exports neither cblas_sgemm nor scipy_cblas_sgemm", FIX_PACKAGE)
    if _address(ctypes.CDLL(None), "cblas_sgemm") != _address(provider, "cblas_sgemm"):
        raise _NoFastBlas("a library loaded earlier (LD_PRELOAD?) already provides cblas_sgemm, and MLX binds to it",
                          "start without it")
    _shim = provider if via == "farense shim" else None
    config = _openblas_call(lib, "get_config", ctypes.c_char_p) or b""
    words = config.decode("utf-8", "replace").split()
    version = words[1] if len(words) > 1 and words[0] == "OpenBLAS" else ""
    return BlasInfo(True, "OpenBLAS", version=version, path=str(path), source=source, via=via,
                    detail=" ".join(words), threads=_openblas_call(lib, "get_num_threads", ctypes.c_int) or 0)


def _find_openblas() -> tuple[Path, str]:
    """$FARENSE_BLAS_LIB, else scipy-openblas32's library, found without importing the package."""
    override = os.environ.get(ENV_LIB, "").strip()
    if override:
        if not Path(override).is_file():
            raise _NoFastBlas(f"{ENV_LIB}={override} does not exist", f"point {ENV_LIB} at an OpenBLAS, or unset it")
        return Path(override), ENV_LIB
    spec = importlib.util.find_spec("scipy_openblas32")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    libs = sorted(p for d in dirs for p in Path(d, "lib").glob("libscipy_openblas*.so*"))
    if not libs:
        raise _NoFastBlas("the scipy-openblas32 package is not installed", FIX_PACKAGE)
    return libs[0], "scipy-openblas32"


def _load_global(path: Path, fix: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise _NoFastBlas(f"{path} could not be loaded: {e}", fix) from None


def _address(lib: ctypes.CDLL, name: str) -> int | None:
    try:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    except AttributeError:
        return None


def _openblas_call(lib: ctypes.CDLL, what: str, restype: type) -> Any:
    """openblas_<what>() under either name (config: "OpenBLAS 0.3.30 DYNAMIC_ARCH ... Haswell MAX_THREADS=64")."""
    for name in (f"scipy_openblas_{what}", f"openblas_{what}"):
        if hasattr(lib, name):
            fn = getattr(lib, name)
            fn.restype = restype
            return fn()
    return None


def _shim_path() -> Path:
    """Where the compiled shim is cached: keyed by its source and the CPU architecture."""
    key = hashlib.sha256(SHIM_SOURCE.read_bytes() + platform.machine().encode()).hexdigest()[:16]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "farense" / "blas" / key / SHIM_NAME


def _compiler() -> list[str]:
    """$CC if set, else cc, gcc or clang from PATH."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        argv = shlex.split(cc)
        if shutil.which(argv[0]):
            return argv
        raise _NoFastBlas(f"no C compiler to build the BLAS shim: CC={cc} not found", FIX_COMPILER)
    for name in ("cc", "gcc", "clang"):
        if found := shutil.which(name):
            return [found]
    raise _NoFastBlas("no C compiler to build the BLAS shim: none of cc, gcc, clang on PATH", FIX_COMPILER)


def _compile_shim(dest: Path) -> None:
    """Build the shim into a temporary name beside `dest`, then rename: racing processes are safe."""
    cc = _compiler()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{SHIM_NAME}.tmp-", dir=dest.parent)
        os.close(fd)
    except OSError as e:
        raise _NoFastBlas(f"the BLAS shim's cache {dest.parent} is not writable: {e.strerror}",
                          "set XDG_CACHE_HOME to a writable directory") from None
    try:
        proc = subprocess.run([*cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(SHIM_SOURCE)],
                              capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            said = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            raise _NoFastBlas(f"{cc[0]} could not build the BLAS shim: {said}", FIX_COMPILER)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _NoFastBlas(f"{cc[0]} could not build the BLAS shim: {e}", FIX_COMPILER) from None
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone already once renamed
