"""How long does planning a cleanup take over 10,000 checkpoint directories?

    .venv/bin/python bench/bench_cleanup_plan.py [--checkpoints 10000] [--runs 20] [--dir DIR]

Creates the runs in a temporary directory (each checkpoint: three empty files and a MANIFEST.json
in the store's format), then times plan_cleanup a few times. The directories were just written, so
the page cache is warm; a cold cache on a spinning disk will be slower.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from farense.disk.cleanup import plan_cleanup  # noqa: E402
from farense.run.layout import checkpoint_name  # noqa: E402


def make_runs(root: Path, runs: int, checkpoints: int) -> None:
    per_run = checkpoints // runs
    sha = hashlib.sha256(b"").hexdigest()
    for r in range(runs):
        ck = root / f"run-{r:03d}" / "checkpoints"
        ck.mkdir(parents=True)
        n = per_run + (1 if r < checkpoints % runs else 0)
        for i in range(n):
            step = 200 * (i + 1)
            d = ck / checkpoint_name(step)
            d.mkdir()
            files = {}
            for name in ("adapters.safetensors", "optimizer.safetensors", "state.json"):
                (d / name).write_bytes(b"")
                files[name] = {"size": 0, "sha256": sha}
            manifest = {"format": "farense-checkpoint", "format_version": 1, "step": step, "created_at": 0.0,
                        "meta": {"step": step, "best_step": 200 * (n // 2), "val_loss": 1.0}, "files": files}
            (d / "MANIFEST.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--keep-last", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="Where to create the runs (default: a new temporary directory).")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "runs"
        t0 = time.perf_counter()
        make_runs(root, args.runs, args.checkpoints)
        print(f"created {args.checkpoints} checkpoint directories in {args.runs} runs: {time.perf_counter() - t0:.1f}s")
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            plan = plan_cleanup(root, keep_last=args.keep_last, now=0.0)
            times.append(time.perf_counter() - t0)
        expected = args.checkpoints - args.runs * (args.keep_last + 1)
        assert len(plan.items) == expected, (len(plan.items), expected)
        print(f"plan_cleanup over {args.checkpoints} checkpoints: {len(plan.items)} to delete, "
              f"best {min(times):.2f}s, worst {max(times):.2f}s over {args.repeat} runs (page cache warm)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
