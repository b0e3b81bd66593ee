"""The first step: resolve the config once, check it, its model, its data and the run to compare with.

Nothing here is retried: a bad config or bad data fails the flow at once, and the error names the
file, the key or line, and what is expected (farense's ConfigError / DataError messages). The
resolved config is what every later step gets; the trainer child trains from its file.
"""

from __future__ import annotations

from collections.abc import Sequence

from prefect import get_run_logger

from farense.config import ExperimentConfig, load_config
from farense.model.demos import prepare_overlay_models
from farense.release.decision import PRODUCTION, check_incumbent
from farense.train.inputs import check_experiment

from .common import step
from .decide import config_run_dir


@step("check-inputs")
def check_inputs_task(config: str, overlays: Sequence[str] = (), workspace: str | None = None,
                      compare_with: str = PRODUCTION) -> ExperimentConfig:
    """The resolved config (a name or file, its overlays applied once), once it, its model, its data and
    the run to compare with are known good."""
    log = get_run_logger()
    cfg = load_config(config, overlays=list(overlays), workspace=workspace)
    prepare_overlay_models(cfg)  # idempotent: verifies an existing build
    report = check_experiment(cfg).report
    check_incumbent(compare_with, config_run_dir(cfg))
    counts = ", ".join(f"{s.name} {s.examples}" for s in report.splits.values())
    log.info(f"{cfg.name}: config valid (fingerprint {cfg.fingerprint}), data {counts}, run dir {cfg.run_dir}")
    return cfg
