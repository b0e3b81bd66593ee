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
from typing import TYPE_CHECKING, Any

from farense.codes import ExitCode, retryable
from farense.commands import add_demo_flags
from farense.config import ExperimentConfig, check_world_size, load_config
from farense.errors import ConfigError, FarenseError, PeerLost, RankFailed, RunLocked
from farense.model.blas import thread_env
from farense.model.demos import prepare_overlay_models
from farense.run.layout import RunPaths
from farense.run.locks import probe_lock
from farense.run.outcome import TrainingOutcome
from farense.run.summary import TrainingSummary
from farense.signals import PreemptionFlag, die_with_parent
from farense.train.distributed import (
    DEFAULT_PORT,
    DEFAULT_RANK_TIMEOUT,
    DEFAULT_STARTUP_TIMEOUT,
    LaunchSpec,
    Watchdog,
    peer_lost,
    pin_rank_gpu,
    spec_defaults_from_env,
    stop_on_stdin,
    supervise,
    world,
)
from farense.train.runner import run_training

ENV_STEPS_AHEAD = "FARENSE_STEPS_AHEAD"

if TYPE_CHECKING:
    from farense.train.distributed import JobOutcome


def train(args: argparse.Namespace) -> int:
    if args.rank_mode:
        pin_rank_gpu()  # before anything imports mlx: CUDA chooses the GPU when it initialises
    # Before anything starts a thread (MLX's stream thread inherits the mask): a preemption signal during
    # start-up waits for the first step's end instead of being lost in MLX's first compile.
    flag = PreemptionFlag().install().hold()
    try:
        if args.die_with_parent:
            die_with_parent()
        hosts, hostfile = (None, None) if args.rank_mode else spec_defaults_from_env(args.hosts, args.hostfile)
        config = load_config(args.config, overlays=args.overlay or [])
        prepare_overlay_models(config)
        if hosts or hostfile:
            flag.restore()  # the launcher polls for signals itself, from the start
            return _launch(args, config, hosts, hostfile)
        return _run(args, config, flag)
    finally:
        flag.restore()


def _run(args: argparse.Namespace, config: ExperimentConfig, flag: PreemptionFlag) -> int:
    """Train in this process: alone, or as one rank of a launched job (--rank-mode)."""
    outcome: TrainingOutcome | None = None
    rank, dog, log, on_step_end = 0, None, None, None
    if args.rank_mode:
        rank, dog, log, on_step_end = _join_job(args, flag)
    try:
        kwargs: dict[str, Any] = {"log": log} if log else {}
        outcome = run_training(config, new_run=args.new_run, preemption=flag, on_step_end=on_step_end,
                               progress_bar=None if not args.no_progress else False,
                               steps_ahead=_steps_ahead(os.environ), **kwargs)
        if rank == 0:
            print(outcome.describe())
    except Exception as e:
        if not isinstance(e, FarenseError) and not args.rank_mode:
            raise
        # A rank: a collective's error because a peer went away is resumable; any other exception
        # is this rank's own failure (exit 1, not retried), never reported as a preemption.
        e = _as_peer_lost(e) if args.rank_mode else e
        if not isinstance(e, FarenseError):
            e = _as_failure(e, rank)
        outcome = TrainingOutcome.from_error(config.run_dir, e)
        print(f"farense: {f'rank {rank}: ' if args.rank_mode else ''}{outcome.state.value}: {e}", file=sys.stderr)
    finally:
        if dog is not None:
            dog.stop()
        flag.restore()
        if args.result_json and outcome is not None and Path(args.result_json).parent.is_dir():
            outcome.write(_rank_result_path(args.result_json, rank) if args.rank_mode else args.result_json)
    return outcome.exit_code


def _rank_result_path(result_json: str | Path, rank: int) -> Path:
    """Each rank's own outcome beside rank 0's (`.../rank0.json` -> `.../rank1.json`): the launcher reads
    them all, so a rank's own failure is not mistaken for the preemption it causes in the others."""
    return Path(result_json).with_name(f"rank{rank}.json")


def _steps_ahead(environ: Any) -> int | None:
    """FARENSE_STEPS_AHEAD (benchmarks: how far the device runs ahead of the bookkeeping), else the default."""
    value = environ.get(ENV_STEPS_AHEAD, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) > 64:
        raise ConfigError(f"{ENV_STEPS_AHEAD}={value!r}: expected a whole number of steps from 0 to 64",
                          source="environment")
    return int(value)


def _join_job(args: argparse.Namespace, flag: Any) -> tuple[int, Any, Any, Any]:
    """One rank of a launched job: a watchdog against dead peers, 'stop' on stdin, prefixed logs."""
    dog = Watchdog(args.rank_timeout, args.startup_timeout, rank=int(os.environ.get("MLX_RANK", "0") or 0)).start()
    stop_on_stdin(flag.request)
    rank = world().rank()  # connects to the peers, under the watchdog's start-up limit
    dog.rank = rank

    def log(message: str) -> None:
        print(message if rank == 0 else f"[rank {rank}] {message}", file=sys.stderr, flush=True)

    return rank, dog, log, lambda step, row, model: dog.beat()


def _as_failure(e: BaseException, rank: int) -> FarenseError:
    """A rank's own exception as the job's failure, its traceback on stderr for whoever fixes it."""
    import traceback

    traceback.print_exception(e, file=sys.stderr)
    return RankFailed(f"rank {rank} failed: {type(e).__name__}: {e}")


def _as_peer_lost(e: BaseException) -> BaseException:
    if peer_lost(e):
        return PeerLost(f"another rank was lost ({e}); stopping as resumable, the retry resumes from the "
                        "last checkpoint")
    return e


def _launch(args: argparse.Namespace, config: ExperimentConfig, hosts: str | None, hostfile: str | None) -> int:
    """Launch and watch the ranks; one exit code and one --result-json for the whole job."""
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
            TrainingOutcome.from_error(config.run_dir, e).write(args.result_json)
        return e.exit_code

    flag = PreemptionFlag().install()
    with tempfile.TemporaryDirectory(prefix="farense-launch-") as tmp:
        rank0_json = Path(tmp) / "rank0.json"
        rank_cmd = [spec.python or sys.executable, "-m", "farense", "--workspace", str(config.workspace), "train",
                    str(config.source), "--rank-mode", "--no-progress", "--die-with-parent",
                    "--rank-timeout", str(spec.rank_timeout), "--startup-timeout", str(spec.startup_timeout),
                    "--result-json", str(rank0_json)]
        rank_cmd += [a for o in config.overlays for a in ("--overlay", o)]
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
        ranks = {r: o for r in range(spec.world_size)
                 if (o := TrainingOutcome.read(_rank_result_path(rank0_json, r))) is not None}

    result = _job_outcome(config, spec, outcome, ranks)
    print(f"farense: {result.state.value}: {result.message}" if not result.ok else
          f"farense: distributed job of {spec.world_size} ranks finished in {outcome.seconds:.1f} s", file=sys.stderr)
    if args.result_json:
        result.write(args.result_json)
    return result.exit_code


def _job_outcome(config: ExperimentConfig, spec: LaunchSpec, job: JobOutcome, ranks: dict[int, TrainingOutcome]
                 ) -> TrainingOutcome:
    """One outcome for the whole job: the launcher's view of the ranks, completed by the ranks' own results
    (those that ran here). A rank's own failure that no retry cures (a bug, bad input, NaN) decides the job
    even when the launcher reported another rank's resumable stop first: that stop was its consequence."""
    # The result that explains the job: a rank's own failure no retry cures, else rank 0's.
    own_failures = [o for _, o in sorted(ranks.items()) if not o.ok and not o.retryable]
    code = job.exit_code
    if own_failures and (code == ExitCode.OK or retryable(code)):
        explains: TrainingOutcome | None = own_failures[0]
        code = own_failures[0].exit_code
    else:
        explains = ranks.get(0)
    if code == ExitCode.OK and explains is not None and not explains.ok:
        code = explains.exit_code  # mpirun reports no rank's exit; rank 0's own result does
    elif code == ExitCode.OK and explains is None and spec.all_local:
        code = ExitCode.PREEMPTED  # rank 0 ran here and left no result: it died before it could write one
    if code == ExitCode.OK:
        result = explains or _summary_outcome(config)
    else:
        own = explains if explains is not None and explains.exit_code == code else None
        message = (own.message if own else "") or f"distributed job stopped ({job.describe()})"
        if code == ExitCode.PREEMPTED and not own:
            message += "; resumable: the retry resumes from the last checkpoint"
        result = TrainingOutcome.failure(config.run_dir, code, message, own.error if own else "DistributedJobFailed")
    rank_codes = {**job.rank_codes, **{r: o.exit_code for r, o in ranks.items() if not o.ok}}  # own word first
    return result.with_(world_size=spec.world_size, ranks={str(r): c for r, c in sorted(rank_codes.items())},
                        killed_after_timeout=job.killed_after_timeout)


def _summary_outcome(config: ExperimentConfig) -> TrainingOutcome:
    """The job's outcome from training_summary.json, when rank 0 ran elsewhere but wrote here too."""
    summary = TrainingSummary.read(RunPaths(config.run_dir).summary) or TrainingSummary()
    return TrainingOutcome.from_summary(config.run_dir, summary)


def register(sub: argparse._SubParsersAction) -> None:
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
