"""Which demo model a config's overlays name, and building it: the tiny random one or the real SmolLM2.

Above both builders (farense.model.demo, farense.model.smollm2), so neither imports the other.
"""

from __future__ import annotations

import os
from pathlib import Path

from farense.config import ExperimentConfig
from farense.errors import FarenseError
from farense.model.demo import build_demo
from farense.model.smollm2 import build_smollm2_demo

# Which demo: the real pretrained model (overlay "demo") or this tiny random one (overlay "tiny")

DEMO_OVERLAYS = ("demo", "tiny")


def demo_overlay(demo: bool | str | None) -> str | None:
    """The overlay a `demo` setting names: True or "demo" the real model, "tiny" the random one."""
    if demo in (None, False, ""):
        return None
    if demo is True or demo in ("demo", "smollm2"):
        return "demo"
    if demo == "tiny":
        return "tiny"
    raise FarenseError(f"demo: expected true, false, 'demo' or 'tiny', got {demo!r}")


def overlays_for(demo: bool | str | None) -> tuple[str, ...]:
    """The overlays a flow's or command's `demo` setting adds to a config: none, or the one demo overlay."""
    overlay = demo_overlay(demo)
    return (overlay,) if overlay else ()


def prepare_demo(overlay: str, model_dir: str | os.PathLike[str]) -> Path:
    """Build (or verify and reuse) the demo model and data the overlay points at; returns the root."""
    root = Path(model_dir).parent
    if overlay == "tiny":
        return build_demo(root).root
    return build_smollm2_demo(root).root


def prepare_overlay_models(config: ExperimentConfig) -> None:
    """Build (or verify and reuse) the demo model each of the config's demo overlays points at."""
    for overlay in config.overlays:
        if overlay in DEMO_OVERLAYS:
            prepare_demo(overlay, config.model_path)
