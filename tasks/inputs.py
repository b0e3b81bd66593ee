"""The first step: check the config, model path, data and the run to compare with, before anything heavy.

Nothing here is retried: a bad config or bad data fails the flow at once, and the error names the
file, the key or line, and what is expected (farense's ConfigError / DataError messages).
"""

from __future__ import annotations

from prefect import get_run_logger

from farense.config import ExperimentConfig, check_inputs
from farense.train.data import validate_data
from farense.release.decision import PRODUCTION
from farense.model.demo import demo_overlay, prepare_demo

from .common import load_experiment, step


@step("check-inputs")
def check_inputs_task(config: str, demo: bool | str = False, workspace: str | None = None,
                      compare_with: str = PRODUCTION) -> ExperimentConfig:
    """The resolved config, once it, its model, its data and the run to compare with are known good."""
    from farense.release.decision import check_incumbent

    from .decide import config_run_dir

    log = get_run_logger()
    cfg = load_experiment(config, demo=demo, workspace=workspace)
    if demo_overlay(demo):
        prepare_demo(demo_overlay(demo), cfg.model_path)  # idempotent: verifies an existing build
    check_inputs(cfg)
    report, _ = validate_data(cfg)
    check_incumbent(compare_with, config_run_dir(cfg, demo))
    counts = ", ".join(f"{s.name} {s.examples}" for s in report.splits.values())
    log.info(f"{cfg.name}: config valid (fingerprint {cfg.fingerprint}), data {counts}, run dir {cfg.run_dir}")
    return cfg
