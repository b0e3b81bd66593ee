"""Pictures for the README's "What you see": not a test, a script a person runs when the UI changes.

    .venv-test/bin/python scripts/screenshots.py            # writes docs/screenshots/
    .venv-test/bin/python scripts/screenshots.py --keep     # and keeps the temporary workspace
    .venv-test/bin/python scripts/screenshots.py --from DIR # photographs a kept workspace again, no new run

It starts a Prefect server through deployments/start-server.sh on 127.0.0.1 and a free port (its own
PREFECT_HOME, telemetry off), runs `farense run v2 --tiny` against it in a temporary workspace, captures
`farense monitor` under tmux while the run trains (docs/screenshots/monitor.txt), then photographs the
run page, its artifacts, the training summary and the decision with headless Chromium (Debian's
`chromium`) as palette PNGs of a few hundred KB at most. The server is stopped by its PID. Nothing
leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from prefect_harness import PrefectAPI, quiet_env, start_server, stop_pid, wait_for  # noqa: E402

WIDTH, HEIGHT = 1600, 1000
COLORS = 96  # palette size: the UI's flat colours survive, the files stay small


def chromium() -> str:
    """The headless browser: Debian's chromium (apt-get install chromium), or Chrome."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("screenshots: no chromium found (Debian/Ubuntu: apt-get install -y chromium)")


def shoot(url: str, out: Path, height: int = HEIGHT, wait_ms: int = 15000) -> Path:
    """One page as a small PNG; the UI is JavaScript, so the browser gets time to fetch and draw."""
    raw = out.with_suffix(".raw.png")
    subprocess.run([chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--no-first-run", "--disable-extensions", "--disable-background-networking",
                    f"--window-size={WIDTH},{height}", f"--virtual-time-budget={wait_ms}",
                    f"--screenshot={raw}", url], check=True, capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(raw) as image:
        image.convert("RGB").quantize(colors=COLORS, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    raw.unlink()
    print(f"  {out.relative_to(REPO)}: {out.stat().st_size // 1000} KB  <- {url}")
    return out


def capture_monitor(env: dict[str, str], workspace: Path, run_dir: Path, out: Path) -> None:
    """`farense monitor RUN` in a tmux pane of 100x30 while the run trains, saved as text."""
    session = f"farense-shots-{os.getpid()}"
    cmd = f"{sys.executable} -m farense --workspace {workspace} monitor {run_dir} --refresh 1"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "100", "-y", "30", cmd], env=env, check=True)
    try:
        time.sleep(4)
        text = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True,
                              check=True).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    lines = [line.rstrip() for line in text.rstrip().splitlines()]
    panel = next((i for i, line in enumerate(lines) if line.startswith("╭")), 0)  # start-up notes before it go
    out.write_text("\n".join(lines[panel:]) + "\n")
    print(f"  {out.relative_to(REPO)}: the monitor while training")


def run_demo(env: dict[str, str], workspace: Path, out_dir: Path) -> Path:
    """`farense run v2 --tiny` against the server; the monitor is captured mid-run. Returns the run dir."""
    run_dir = workspace / "runs" / "tiny" / "v2"
    log = open(workspace / "farense-run.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "farense", "--workspace", str(workspace), "run", "v2", "--tiny"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def mid_run() -> bool:
            rows = (run_dir / "metrics.jsonl").read_bytes().count(b"\n") if (run_dir / "metrics.jsonl").exists() else 0
            return rows >= 60 or proc.poll() is not None

        wait_for(mid_run, 600, "the demo run to be well into training", interval=0.5)
        if proc.poll() is None:
            capture_monitor(env, workspace, run_dir, out_dir / "monitor.txt")
        if proc.wait(timeout=900) != 0:
            sys.exit(f"screenshots: farense run failed:\n{(workspace / 'farense-run.log').read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            stop_pid(proc.pid)
        log.close()
    return run_dir


def photograph(api: PrefectAPI, ui: str, out_dir: Path) -> None:
    """The run page (the V1 UI draws the run graph's labels cleanly in headless Chromium), its artifacts tab,
    the progress bar, the training summary, the preflight and the decision (Prefect's default UI, under /v2)."""
    (run,) = api._call("POST", "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})
    found = api._call("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    by_key = {a["key"]: a["id"] for a in found if a.get("key")}
    shoot(f"{ui}/runs/flow-run/{run['id']}", out_dir / "run.png")
    shoot(f"{ui}/v2/runs/flow-run/{run['id']}?tab=Artifacts", out_dir / "artifacts.png")
    for key, name, height in (("training-progress-v2", "progress.png", 560),
                              ("training-summary-v2", "training-summary.png", 1000),
                              ("preflight-v2", "preflight.png", 1000), ("decision-v2", "decision.png", 760)):
        shoot(f"{ui}/v2/artifacts/artifact/{by_key[key]}", out_dir / name, height=height)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary workspace (server logs, the run).")
    parser.add_argument("--from", dest="workspace", type=Path, help="A workspace kept by --keep: photograph it again.")
    args = parser.parse_args(argv)
    chromium()
    args.out.mkdir(parents=True, exist_ok=True)
    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="farense-shots-"))
    home = workspace / "prefect-home"
    server = start_server(home, workspace / "logs", PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false")
    try:
        env = quiet_env(home, server.api_url, FARENSE_TRAINING_LOCK=str(workspace / "training.lock"),
                        HF_HUB_OFFLINE="1", TERM="xterm-256color", COLUMNS="100")
        print(f"server {server.url} (pid {server.pid}); workspace {workspace}")
        if args.workspace is None:
            run_demo(env, workspace, args.out)
        photograph(PrefectAPI(server.api_url), server.url, args.out)
    finally:
        server.stop()
        if not args.keep and args.workspace is None:
            shutil.rmtree(workspace, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
