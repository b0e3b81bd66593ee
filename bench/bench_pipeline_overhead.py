"""What the Prefect pipeline costs over calling the trainer directly, on the demo model.

    python bench/bench_pipeline_overhead.py [--iters 150] [--repeat 2] [--json]

1. `python -m farense train` on v2 + the demo overlay, in a fresh workspace: wall seconds.
2. The pipeline flow (Prefect's ephemeral API, as `farense run` uses it) on the same config in
   another fresh workspace, in this process: seconds from calling the flow until its train task
   ended (API start-up, input check, preflight, cleanup, the task's subprocess and its watcher),
   the train task alone, and the whole pipeline (evaluation, decision, promotion, notification).
The overhead is (2: flow call to end of training) - (1: direct). The two alternate `--repeat`
times and the fastest of each counts, so other work on the machine distorts less. The flow's
API start-up is paid once per process, as `farense run` pays it. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIG = """extends = ["{repo}/configs/v2.toml", "{repo}/configs/overlays/tiny.toml"]
name = "bench"

[training]
iters = {iters}
"""


def workspace(root: Path, name: str, iters: int) -> tuple[Path, Path]:
    """A fresh workspace with the demo built (not timed) and the bench config."""
    from farense.model.demo import build_demo

    ws = root / name
    build_demo(ws / ".farense" / "tiny")
    cfg = ws / "bench.toml"
    cfg.write_text(CONFIG.format(repo=REPO, iters=iters))
    return ws, cfg


def time_direct(ws: Path, cfg: Path) -> float:
    argv = [sys.executable, "-m", "farense", "--workspace", str(ws), "train", str(cfg), "--no-progress",
            "--result-json", str(ws / "result.json")]
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"farense train failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def time_flow(ws: Path, cfg: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    wall0 = time.time()
    from flows.pipeline import training_flow

    state = training_flow(config=str(cfg), workspace=str(ws), promote=False, return_state=True)
    total = time.perf_counter() - t0
    if not state.is_completed():
        raise SystemExit(f"the pipeline flow did not complete: {state.name}: {state.message}")

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    train = next(r for r in runs if r.name.startswith("train-"))
    return {
        "flow_until_trained": train.end_time.timestamp() - wall0,
        "train_task": (train.end_time - train.start_time).total_seconds(),
        "before_train_task": train.start_time.timestamp() - wall0,
        "whole_pipeline": total,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=150, help="Optimizer steps (the demo overlay's 150 by default).")
    parser.add_argument("--repeat", type=int, default=2, help="Alternate direct and flow runs this many times.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    args = parser.parse_args(argv)

    directs: list[float] = []
    flows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="farense-bench-") as tmp:
        root = Path(tmp)
        os.environ.update(PREFECT_HOME=str(root / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                          DO_NOT_TRACK="1", PREFECT_LOGGING_LEVEL="ERROR")
        os.environ.pop("PREFECT_API_URL", None)
        for i in range(args.repeat):
            directs.append(time_direct(*workspace(root, f"direct-{i}", args.iters)))
            flows.append(time_flow(*workspace(root, f"flow-{i}", args.iters)))
    direct = min(directs)
    flow = min(flows, key=lambda f: f["flow_until_trained"])  # one coherent run, the fastest
    first = flows[0]  # the first call also starts Prefect's ephemeral API, as every `farense run` does
    out = {"iters": args.iters, "direct_train": direct, **flow, "overhead": flow["flow_until_trained"] - direct,
           "overhead_first_call": first["flow_until_trained"] - direct,
           "train_task_overhead": flow["train_task"] - direct,
           "all_direct": directs, "all_flow_until_trained": [f["flow_until_trained"] for f in flows]}
    if args.json:
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}))
        return 0
    rows = [
        ("farense train, directly", direct),
        ("pipeline flow: call until training ended", flow["flow_until_trained"]),
        ("  of which before the train task (checks, preflight, cleanup, API calls)", flow["before_train_task"]),
        ("  of which the train task", flow["train_task"]),
        ("pipeline flow: whole (with evaluation, decision, notification)", flow["whole_pipeline"]),
        ("overhead of the pipeline over the trainer", out["overhead"]),
        ("  of which the train task's own (subprocess, watcher, artifacts)", out["train_task_overhead"]),
        ("first call in a process, with the ephemeral API start (farense run)", first["flow_until_trained"]),
        ("  its overhead over the trainer", out["overhead_first_call"]),
    ]
    print(f"demo model, v2, {args.iters} steps, {os.cpu_count()} CPUs; fastest of {args.repeat} alternating runs "
          f"(direct: {', '.join(f'{d:.1f}' for d in directs)} s; flow until trained: "
          f"{', '.join(f'{f:.1f}' for f in out['all_flow_until_trained'])} s)")
    for label, seconds in rows:
        print(f"{label:<72} {seconds:8.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
