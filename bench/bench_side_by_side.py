"""V1 and V2 on the demo model one after the other (each with every core) against side by side (each with
its share: `farense run --parallel`, farense.train.supervisor.trainings_side_by_side), as whole
`farense train` processes, in alternating rounds on this machine.

    nice -n 10 python bench/bench_side_by_side.py [--steps 12] [--rounds 1] [--demo DIR]

Each round trains both configs from scratch for `--steps` optimizer steps (the demo overlay's
settings otherwise: LoRA on 16 of 30 blocks, 8 examples a step, the prefix cache) in each mode, and
prints the wall time of each mode, their ratio, and whether the adapters of the two modes are the
same bytes. Needs the demo model (`farense demo init`); nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from farense.model.blas import thread_env  # noqa: E402


def write_config(ws: Path, name: str, steps: int, demo: Path, mode: str) -> Path:
    path = ws / f"{name}-{mode}.toml"
    path.write_text(
        f'extends = ["{REPO}/configs/{name}.toml", "{REPO}/configs/overlays/demo.toml"]\nname = "{name}"\n'
        f'[model]\npath = "{demo / "model"}"\n[data]\ndir = "{demo / "data"}"\n'
        f"[training]\nepochs = 0\niters = {steps}\nwarmup_steps = 2\n[validation]\nevery_steps = {steps}\n"
        f'[checkpoint]\nevery_steps = {steps}\n[output]\nruns_dir = "{ws / mode}"\n')
    return path


def trainer(config: Path, ws: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "farense", "--workspace", str(ws), "train", str(config),
                             "--no-progress"], cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"a trainer failed ({proc.returncode}):\n{err[-3000:]}")


def one_after_the_other(ws: Path, configs: list[Path]) -> float:
    started = time.monotonic()
    for c in configs:
        finish(trainer(c, ws, {}))
    return time.monotonic() - started


def side_by_side(ws: Path, configs: list[Path]) -> float:
    started = time.monotonic()
    share = thread_env(len(configs))
    for p in [trainer(c, ws, share) for c in configs]:
        finish(p)
    return time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--demo", type=Path, default=REPO / ".farense" / "demo")
    a = ap.parse_args()
    if not (a.demo / "model").is_dir():
        sys.exit(f"no demo model in {a.demo}: run `farense demo init` first")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{cores} cores; V1 and V2, {a.steps} steps each; side by side: {thread_env(2) or 'OPENBLAS_NUM_THREADS as set'}")
    times: dict[str, list[float]] = {"one after the other": [], "side by side": []}
    with tempfile.TemporaryDirectory(prefix="farense-bench-sbs-") as tmp:
        for r in range(a.rounds):
            order = ["one after the other", "side by side"][:: 1 if r % 2 == 0 else -1]
            for mode in order:
                ws = Path(tmp) / f"round{r}"
                ws.mkdir(exist_ok=True)
                tag = "seq" if mode == "one after the other" else "sbs"
                configs = [write_config(ws, n, a.steps, a.demo, tag) for n in ("v1", "v2")]
                run = one_after_the_other if tag == "seq" else side_by_side
                times[mode].append(run(ws, configs))
                print(f"round {r + 1}: {mode}: {times[mode][-1]:.1f} s", flush=True)
            same = all((ws / "seq" / n / "adapters" / "adapters.safetensors").read_bytes()
                       == (ws / "sbs" / n / "adapters" / "adapters.safetensors").read_bytes() for n in ("v1", "v2"))
            print(f"round {r + 1}: adapters of the two modes {'identical' if same else 'DIFFER'}")
    seq, sbs = (statistics.median(times[m]) for m in times)
    print(f"median: one after the other {seq:.1f} s, side by side {sbs:.1f} s: {seq / sbs:.2f}x")


if __name__ == "__main__":
    main()
