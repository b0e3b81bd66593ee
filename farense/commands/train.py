"""`farense train CONFIG`: run or resume one training, with exit codes a parent can act on."""

from __future__ import annotations

import argparse
import sys

import orjson

from ..config import load_config
from ..errors import FarenseError
from ..states import EXIT_OK, RunState


def train(args: argparse.Namespace) -> int:
    from ..signals import PreemptionFlag, die_with_parent

    if args.die_with_parent:
        die_with_parent()
    config = load_config(args.config, overlays=args.overlay or [])
    if "demo" in (args.overlay or []):
        _ensure_demo(config)
    from ..trainer import TrainResult, run_training

    flag = PreemptionFlag().install()
    result: dict | None = None
    code = EXIT_OK
    try:
        res: TrainResult = run_training(config, new_run=args.new_run, preemption=flag,
                                        progress_bar=None if not args.no_progress else False)
        result = res.to_dict()
        print(f"{res.state.value}: step {res.step}/{res.total_steps}, best val loss "
              f"{res.best_val_loss if res.best_val_loss is None else round(res.best_val_loss, 4)} at step "
              f"{res.best_step}, gap {res.gap_status} -> {res.run_dir}/adapters")
    except FarenseError as e:
        state = {75: RunState.PREEMPTED, 76: RunState.PAUSED_DISK_FULL}.get(e.exit_code, RunState.FAILED)
        result = {"state": state.value, "run_dir": str(config.run_dir), "message": str(e),
                  "error": type(e).__name__, "retryable": e.retryable, "exit_code": e.exit_code}
        print(f"farense: {state.value}: {e}", file=sys.stderr)
        code = e.exit_code
    finally:
        flag.restore()
        if args.result_json and result is not None:
            from ..fsutil import atomic_write_bytes

            atomic_write_bytes(args.result_json, orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return code


def _ensure_demo(config) -> None:
    """With --demo, build the demo model and data where the overlay expects them (idempotent)."""
    from pathlib import Path

    from ..demo import build_demo

    model_dir = Path(config.model_path)
    build_demo(model_dir.parent)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="Train a config, resuming from its newest verified checkpoint.")
    p.add_argument("config", help="Config name (configs/NAME.toml) or path.")
    p.add_argument("--new-run", action="store_true", help="Start over: delete this run's checkpoints and metrics.")
    p.add_argument("--overlay", action="append", help="Overlay to apply (configs/overlays/NAME.toml), repeatable.")
    p.add_argument("--demo", dest="overlay", action="append_const", const="demo",
                   help="Use the demo overlay (tiny offline model; built if missing).")
    p.add_argument("--result-json", help="Write the outcome as JSON here (for orchestrators).")
    p.add_argument("--die-with-parent", action="store_true",
                   help="Exit when the parent process dies (so an orphan never holds the run lock).")
    p.add_argument("--no-progress", action="store_true", help="No progress bar even on a terminal.")
    p.set_defaults(handler=train)
