"""`farense train CONFIG`: run or resume one training, with exit codes a parent can act on.

With --hosts/--hostfile (or FARENSE_HOSTS/FARENSE_HOSTFILE) the same command launches
data-parallel training through mlx.launch: this process becomes the launcher, each rank is a
`farense train --rank-mode` process, and the exit code means what it means for one trainer.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

from ..config import load_config
from ..demo import DEMO_OVERLAYS, prepare_demo
from ..errors import FarenseError
from . import add_demo_flags
from ..states import EXIT_OK, RunState

STATE_FOR_CODE = {75: RunState.PREEMPTED, 76: RunState.PAUSED_DISK_FULL}


def train(args: argparse.Namespace) -> int:
    from ..distributed import pin_rank_gpu, spec_defaults_from_env
    from ..signals import die_with_parent

    if args.rank_mode:
        pin_rank_gpu()  # before anything imports mlx: the GPU is chosen when CUDA initialises
    if args.die_with_parent:
        die_with_parent()
    hosts, hostfile = (None, None) if args.rank_mode else spec_defaults_from_env(args.hosts, args.hostfile)
    config = load_config(args.config, overlays=args.overlay or [])
    for overlay in set(args.overlay or []) & set(DEMO_OVERLAYS):
        prepare_demo(overlay, config.model_path)
    if hosts or hostfile:
        return _launch(args, config, hosts, hostfile)
    return _run(args, config)


def _run(args: argparse.Namespace, config: Any) -> int:
    """Train in this process: alone, or as one rank of a launched job (--rank-mode)."""
    from ..signals import PreemptionFlag
    from ..trainer import TrainResult, run_training

    flag = PreemptionFlag().install()
    result: dict | None = None
    code = EXIT_OK
    rank, dog, log, on_step_end = 0, None, None, None
    if args.rank_mode:
        rank, dog, log, on_step_end = _join_job(args, flag)
    try:
        kwargs: dict[str, Any] = {"log": log} if log else {}
        res: TrainResult = run_training(config, new_run=args.new_run, preemption=flag, on_step_end=on_step_end,
                                        progress_bar=None if not args.no_progress else False, **kwargs)
        result = res.to_dict()
        if rank == 0:
            print(f"{res.state.value}: step {res.step}/{res.total_steps}, best val loss "
                  f"{res.best_val_loss if res.best_val_loss is None else round(res.best_val_loss, 4)} at step "
                  f"{res.best_step}, gap {res.gap_status} -> {res.run_dir}/adapters")
    except Exception as e:
        if not isinstance(e, FarenseError) and not args.rank_mode:
            raise
        # A rank: a collective's error because a peer went away is resumable; any other exception
        # is this rank's own failure (exit 1, not retried), never reported as a preemption.
        e = _as_peer_lost(e) if args.rank_mode else e
        if not isinstance(e, FarenseError):
            e = _as_failure(e, rank)
        state = STATE_FOR_CODE.get(e.exit_code, RunState.FAILED)
        result = _failure(config, state, str(e), type(e).__name__, e.retryable, e.exit_code)
        print(f"farense: {f'rank {rank}: ' if args.rank_mode else ''}{state.value}: {e}", file=sys.stderr)
        code = e.exit_code
    finally:
        if dog is not None:
            dog.stop()
        flag.restore()
        if args.result_json and result is not None and rank == 0 and Path(args.result_json).parent.is_dir():
            _write_json(args.result_json, result)
    return code


def _join_job(args: argparse.Namespace, flag: Any) -> tuple[int, Any, Any, Any]:
    """One rank of a launched job: a watchdog against dead peers, 'stop' on stdin, prefixed logs."""
    from ..distributed import Watchdog, stop_on_stdin, world

    dog = Watchdog(args.rank_timeout, args.startup_timeout, rank=int(os.environ.get("MLX_RANK", "0") or 0)).start()
    stop_on_stdin(flag.request)
    rank = world().rank()  # connects to the peers, under the watchdog's start-up limit
    dog.rank = rank

    def log(message: str) -> None:
        print(message if rank == 0 else f"[rank {rank}] {message}", file=sys.stderr, flush=True)

    return rank, dog, log, lambda step, row, model: dog.beat()


class RankFailed(FarenseError):
    """A rank died of an exception that is no peer's loss: a bug or a broken install, not a
    preemption; a retry would fail the same way."""

    exit_code = 1
    retryable = False


def _as_failure(e: BaseException, rank: int) -> FarenseError:
    import traceback

    traceback.print_exception(e, file=sys.stderr)
    return RankFailed(f"rank {rank} failed: {type(e).__name__}: {e}")


def _as_peer_lost(e: BaseException) -> BaseException:
    from ..distributed import PeerLost, peer_lost

    if peer_lost(e):
        return PeerLost(f"another rank was lost ({e}); stopping as resumable, the retry resumes from the "
                        "last checkpoint")
    return e


def _launch(args: argparse.Namespace, config: Any, hosts: str | None, hostfile: str | None) -> int:
    """Launch and watch the ranks; one exit code and one --result-json for the whole job."""
    from ..blas import thread_env
    from ..config import check_world_size
    from ..distributed import LaunchSpec, supervise
    from ..errors import RunLocked
    from ..layout import RunPaths
    from ..locks import probe_lock
    from ..signals import PreemptionFlag

    try:
        spec = LaunchSpec.create(hosts=hosts, hostfile=hostfile, ranks_per_host=args.ranks_per_host,
                                 backend=args.backend, port=args.port, rank_timeout=args.rank_timeout,
                                 startup_timeout=args.startup_timeout, python=args.python)
        check_world_size(config, spec.world_size)
        held = probe_lock(RunPaths(config.run_dir).lock)
        if held.held:  # a second job would only collide on the ring's ports before rank 0 says so
            raise RunLocked(f"run {config.run_dir} is in use by {held.describe()}; not launching")
    except FarenseError as e:
        print(f"farense: error: {e}", file=sys.stderr)
        if args.result_json:
            _write_json(args.result_json, _failure(config, RunState.FAILED, str(e), type(e).__name__,
                                                   e.retryable, e.exit_code))
        return e.exit_code

    flag = PreemptionFlag().install()
    with tempfile.TemporaryDirectory(prefix="farense-launch-") as tmp:
        rank0_json = Path(tmp) / "rank0.json"
        rank_cmd = [spec.python or sys.executable, "-m", "farense", "--workspace", str(config.workspace), "train",
                    str(config.source), "--rank-mode", "--no-progress", "--die-with-parent",
                    "--rank-timeout", str(spec.rank_timeout), "--startup-timeout", str(spec.startup_timeout),
                    "--result-json", str(rank0_json)]
        rank_cmd += [a for o in (args.overlay or []) for a in ("--overlay", o)]
        rank_cmd += ["--new-run"] if args.new_run else []
        print(f"farense: launching {spec.world_size} ranks: " + " ".join(spec.launcher_argv(rank_cmd)[1:]),
              file=sys.stderr, flush=True)
        try:
            outcome = supervise(spec.launcher_argv(rank_cmd), world_size=spec.world_size,
                                rank_timeout=spec.rank_timeout, stop_requested=lambda: flag.requested,
                                env={**os.environ, "PYTHONUNBUFFERED": "1",
                                     **(thread_env(spec.world_size) if spec.all_local else {})})
        finally:
            flag.restore()
        rank0 = _read_json(rank0_json)

    code = outcome.exit_code
    if code == EXIT_OK and rank0 is not None and rank0.get("exit_code") not in (None, EXIT_OK):
        code = int(rank0["exit_code"])  # mpirun reports no rank's exit; rank 0's own result does
    elif code == EXIT_OK and rank0 is None and spec.all_local:
        code = 75  # rank 0 ran here and left no result: it died before it could write one
    if code == EXIT_OK:
        result = rank0 or _summary_result(config)
        print(f"farense: distributed job of {spec.world_size} ranks finished in {outcome.seconds:.1f} s",
              file=sys.stderr)
    else:
        state = STATE_FOR_CODE.get(code, RunState.FAILED)
        own = rank0 if rank0 and rank0.get("exit_code") == code else None
        message = (own or {}).get("message") or f"distributed job stopped ({outcome.describe()})"
        if code == 75 and not own:
            message += "; resumable: the retry resumes from the last checkpoint"
        result = _failure(config, state, message, (own or {}).get("error", "DistributedJobFailed"),
                          code in (73, 75, 76), code)
        print(f"farense: {state.value}: {message}", file=sys.stderr)
    result.update(world_size=spec.world_size, ranks={str(r): c for r, c in outcome.rank_codes.items()},
                  killed_after_timeout=outcome.killed_after_timeout)
    if args.result_json:
        _write_json(args.result_json, result)
    return code


def _failure(config: Any, state: RunState, message: str, error: str, retryable: bool, code: int) -> dict[str, Any]:
    return {"state": state.value, "run_dir": str(config.run_dir), "message": message, "error": error,
            "retryable": retryable, "exit_code": code}


def _summary_result(config: Any) -> dict[str, Any]:
    """The job's outcome from training_summary.json, when rank 0 ran elsewhere but wrote here too."""
    from ..layout import RunPaths

    s = _read_json(RunPaths(config.run_dir).summary) or {}
    return {"state": s.get("state", RunState.COMPLETED.value), "run_dir": str(config.run_dir),
            "step": s.get("final_step", 0), "total_steps": s.get("total_steps", 0), "resumed_from": None,
            "best_step": s.get("best_step"), "best_val_loss": s.get("best_val_loss"),
            "train_val_gap": s.get("train_val_gap"), "gap_status": s.get("gap_status"), "message": ""}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def _write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    from ..fsutil import atomic_write_bytes

    atomic_write_bytes(path, orjson.dumps(data, option=orjson.OPT_INDENT_2))


def register(sub: argparse._SubParsersAction) -> None:
    from ..distributed import DEFAULT_PORT, DEFAULT_RANK_TIMEOUT, DEFAULT_STARTUP_TIMEOUT

    p = sub.add_parser("train", help="Train a config, resuming from its newest verified checkpoint.")
    p.add_argument("config", help="Config name (configs/NAME.toml) or path.")
    p.add_argument("--new-run", action="store_true", help="Start over: delete this run's checkpoints and metrics.")
    p.add_argument("--overlay", action="append", help="Overlay to apply (configs/overlays/NAME.toml), repeatable.")
    add_demo_flags(p)
    p.add_argument("--result-json", help="Write the outcome as JSON here (for orchestrators).")
    p.add_argument("--die-with-parent", action="store_true",
                   help="Exit when the parent process dies (so an orphan never holds the run lock).")
    p.add_argument("--no-progress", action="store_true", help="No progress bar even on a terminal.")
    d = p.add_argument_group("data-parallel training (mlx.launch; docs/distributed.md)")
    d.add_argument("--hosts", help="Comma-separated hosts, one rank each (IP addresses for the ring backend; "
                                   "127.0.0.1 runs a rank here). Default: $FARENSE_HOSTS.")
    d.add_argument("--hostfile", help="mlx.launch JSON hostfile (ssh names, IPs, backend, env). "
                                      "Default: $FARENSE_HOSTFILE.")
    d.add_argument("--ranks-per-host", "-n", type=int, default=1, help="Ranks on each --hosts entry (default 1).")
    d.add_argument("--backend", help="ring, mpi, nccl, jaccl (default: the hostfile's, else nccl with CUDA, else ring).")
    d.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"First TCP port of the ring (one per rank) or the NCCL port (default {DEFAULT_PORT}).")
    d.add_argument("--rank-timeout", type=float, default=DEFAULT_RANK_TIMEOUT,
                   help="Seconds a rank may go without completing a step before the job stops as resumable "
                        f"(a dead or hung peer; default {DEFAULT_RANK_TIMEOUT:.0f}).")
    d.add_argument("--startup-timeout", type=float, default=DEFAULT_STARTUP_TIMEOUT,
                   help="The same limit until the first step ends: connecting, loading, compiling "
                        f"(default {DEFAULT_STARTUP_TIMEOUT:.0f}).")
    d.add_argument("--python", help="Python interpreter on every host (default: this one's path).")
    p.add_argument("--rank-mode", action="store_true", help=argparse.SUPPRESS)  # set by the launcher
    p.set_defaults(handler=train)
