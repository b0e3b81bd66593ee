"""Data-parallel training over processes and hosts, through MLX's own distributed layer.

Two halves. The launcher (`farense train CONFIG --hosts ...`) starts one `farense train` rank
per host entry through `mlx.launch` (ring, MPI, NCCL backends), watches it and turns how the
ranks ended into one exit code a parent can act on: 0, or resumable (75) whenever a rank died,
hung or was lost, or the rank's own code for bad input and numerical errors. The rank side gives
the trainer what distribution needs and nothing else:

- only rank 0 holds the run lock and writes (checkpoints, metrics, run state);
- every rank resumes from rank 0's verified checkpoint: its bytes are broadcast and verified
  again against their manifest, so hosts need not share a filesystem;
- every rank checks that it runs rank 0's config and data (fingerprints);
- a preemption seen by any rank stops all ranks after the same step (the flags ride on the step's loss all_sum);
- a dead peer never hangs a rank: the ring backend reports a lost connection (PeerLost), and a
  watchdog ends a rank that completes no step within the time-out (a hung or vanished host).

No Prefect here: the flows call `farense train --hosts` like any other command.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

import orjson

from farense.codes import ExitCode, died
from farense.errors import ConfigError, FingerprintMismatch, PeerLost
from farense.run.checkpoint import CheckpointStore
from farense.run.layout import MANIFEST_NAME, checkpoint_name
from farense.run.locks import RunLock
from farense.run.outcome import job_exit_code

# A rank that completes no optimizer step for this long is taken for stuck behind a dead or hung
# peer. It must exceed the slowest step plus a validation pass and a checkpoint write.
DEFAULT_RANK_TIMEOUT = 300.0
# Until the first step ends: peers connecting, loading the model, compiling the step.
DEFAULT_STARTUP_TIMEOUT = 900.0
# After the first rank failed, how long the launcher waits beyond the rank time-out before it
# kills what is left (a rank that ignores SIGTERM because it is stopped, or mlx.launch waiting on it).
LAUNCH_GRACE_SECONDS = 20.0
# After a rank was killed or lost (not its own exit): the others cannot agree on anything any more
# (every decision is a collective); those blocked in a collective (NCCL waits for the dead peer
# until the rank time-out) are killed this long after it. Enough for a checkpoint already being
# written to finish; the last committed checkpoint is intact either way.
DEATH_GRACE_SECONDS = 5.0
DEFAULT_PORT = 32323  # mlx.launch's default starting port for the ring backend
ENV_HOSTS = "FARENSE_HOSTS"  # defaults for --hosts / --hostfile, e.g. from a Prefect work pool's env
ENV_HOSTFILE = "FARENSE_HOSTFILE"
# The launcher names each rank's GPU here (comma-separated, indexed by rank); the rank applies it
# before mlx is imported. mlx.launch itself gives every rank `CUDA_VISIBLE_DEVICES=rank % -n`, and
# with the host list already repeated (-n 1) that is GPU 0 for all of them: NCCL then refuses
# ("Duplicate GPU detected: rank 0 and rank 1 both on CUDA device ...").
ENV_RANK_GPUS = "FARENSE_RANK_GPUS"
BACKENDS = ("ring", "mpi", "nccl", "jaccl", "jaccl-ring")
STOP_LINE = b"stop\n"  # written to every rank's stdin (mlx.launch broadcasts it): checkpoint and stop
LOCAL_HOSTS = ("127.0.0.1",)  # mlx.launch starts these directly; every other name goes through ssh


# =========================================================================== launcher side


@dataclass(frozen=True)
class LaunchSpec:
    """Where the ranks run and how long a rank may go without finishing a step."""

    hosts: tuple[str, ...] = ()  # one entry per rank (already repeated); empty with a hostfile
    hostfile: Path | None = None
    backend: str | None = None  # None: the hostfile's, else nccl with CUDA, else ring (as mlx.launch)
    port: int = DEFAULT_PORT
    rank_timeout: float = DEFAULT_RANK_TIMEOUT
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    python: str | None = None  # the interpreter on every host; default: this one's path
    world_size: int = field(default=0, compare=False)

    @classmethod
    def create(cls, *, hosts: str | None = None, hostfile: str | os.PathLike[str] | None = None,
               ranks_per_host: int = 1, backend: str | None = None, port: int = DEFAULT_PORT,
               rank_timeout: float = DEFAULT_RANK_TIMEOUT, startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
               python: str | None = None) -> "LaunchSpec":
        """Validate everything about the launch before anything starts; ConfigError lists every problem."""
        problems: list[str] = []
        host_list: list[str] = []
        hf_path: Path | None = None
        hf_backend = ""
        if bool(hosts) == bool(hostfile):
            problems.append("give exactly one of --hosts and --hostfile")
        if isinstance(ranks_per_host, bool) or not isinstance(ranks_per_host, int) or ranks_per_host < 1:
            problems.append(f"--ranks-per-host: expected an integer >= 1, got {ranks_per_host!r}")
            ranks_per_host = 1
        if hostfile and ranks_per_host != 1:
            problems.append("--ranks-per-host applies to --hosts only; list every rank in the hostfile")
        if backend is not None and backend not in BACKENDS:
            problems.append(f"--backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
        if not (1024 <= port <= 65535 - 256):
            problems.append(f"--port: expected a TCP port in 1024..65279, got {port}")
        for name, value in (("--rank-timeout", rank_timeout), ("--startup-timeout", startup_timeout)):
            if not (isinstance(value, (int, float)) and value > 0):
                problems.append(f"{name}: expected a number of seconds > 0, got {value!r}")
        ips_per_rank: list[list[str]] = []
        if hosts:
            names = [h.strip() for h in hosts.split(",")]
            if any(not h for h in names):
                problems.append(f"--hosts: empty host name in {hosts!r} (expected host1,host2,...)")
            for h in (h for h in names if h):
                host_list.extend([h] * ranks_per_host)
                ips_per_rank.extend([[h] if _is_ip(h) else []] * ranks_per_host)
        elif hostfile:
            hf_path = Path(hostfile).expanduser().resolve()
            try:
                from mlx._distributed_utils.common import Hostfile

                parsed = Hostfile.from_file(hf_path)
            except ImportError:
                problems.append("--hostfile: this mlx has no mlx.launch (install mlx >= 0.32)")
            except ValueError as e:
                problems.append(f"--hostfile: {e}; expected JSON like "
                                '{"backend": "ring", "hosts": [{"ssh": "mac1", "ips": ["10.0.0.1"]}, ...]}')
            else:
                hf_backend = parsed.backend
                host_list = [h.ssh_hostname for h in parsed.hosts]
                ips_per_rank = [list(h.ips) for h in parsed.hosts]
                if not host_list:
                    problems.append(f"--hostfile: {hf_path} lists no hosts")
        if not problems and (backend or hf_backend or ("nccl" if _cuda_available() else "ring")) == "ring":
            no_ip = [h for h, ips in zip(host_list, ips_per_rank) if not ips]
            if no_ip:
                problems.append(_ring_needs_ips(no_ip))
        if problems:
            raise ConfigError(problems, source="farense train --hosts/--hostfile")
        return cls(hosts=tuple(host_list) if hosts else (), hostfile=hf_path, backend=backend, port=port,
                   rank_timeout=float(rank_timeout), startup_timeout=float(startup_timeout), python=python,
                   world_size=len(host_list))

    @property
    def all_local(self) -> bool:
        """Every rank runs on this machine (mlx.launch starts 127.0.0.1 entries without ssh)."""
        if self.hostfile is not None:
            from mlx._distributed_utils.common import Hostfile

            return all(h.ssh_hostname in LOCAL_HOSTS for h in Hostfile.from_file(self.hostfile).hosts)
        return all(h in LOCAL_HOSTS for h in self.hosts)

    def rank_hosts(self) -> list[str]:
        """The host of every rank, in rank order (ssh names; 127.0.0.1 for this machine)."""
        if self.hostfile is not None:
            from mlx._distributed_utils.common import Hostfile

            return [h.ssh_hostname for h in Hostfile.from_file(self.hostfile).hosts]
        return list(self.hosts)

    def launcher_argv(self, rank_command: Sequence[str], environ: dict[str, str] | None = None) -> list[str]:
        """`mlx.launch ... -- rank_command` (the console script beside this interpreter when there)."""
        script = Path(sys.executable).with_name("mlx.launch")
        if script.exists():
            argv = [sys.executable, str(script)]
        else:  # an install without console scripts (pip --target): the same entry point
            argv = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; "
                                          "sys.argv[0] = 'mlx.launch'; sys.exit(main())"]
        if self.hostfile is not None:
            argv += ["--hostfile", str(self.hostfile)]
        else:
            argv += ["--hosts", ",".join(self.hosts)]
        if self.backend:
            argv += ["--backend", self.backend]
        argv += ["--starting-port", str(self.port), "--nccl-port", str(self.port)]
        env = os.environ if environ is None else environ
        argv += ["--env", f"{ENV_RANK_GPUS}={','.join(rank_gpus(self.rank_hosts(), env.get('CUDA_VISIBLE_DEVICES')))}"]
        # NCCL settings of the launching shell reach every rank, also one started through ssh with
        # its own environment (NCCL_NVLS_ENABLE=0: NVLink multicast off on shared hosts).
        argv += [a for k in sorted(env) if k.startswith("NCCL_") for a in ("--env", f"{k}={env[k]}")]
        return argv + ["--", *rank_command]


def rank_gpus(rank_hosts: Sequence[str], visible: str | None = None) -> list[str]:
    """The GPU of each rank: its position among the ranks of its host (local rank), or, on this
    machine when CUDA_VISIBLE_DEVICES narrows the GPUs, the local rank-th of those."""
    mine = [d.strip() for d in visible.split(",") if d.strip()] if visible else []
    seen: dict[str, int] = {}
    out = []
    for host in rank_hosts:
        local = seen.get(host, 0)
        seen[host] = local + 1
        out.append(mine[local] if host in LOCAL_HOSTS and local < len(mine) else str(local))
    return out


def pin_rank_gpu(environ: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """In a launched rank, before mlx is imported: CUDA_VISIBLE_DEVICES = this rank's own GPU.

    Returns the GPU chosen, or None when not launched by farense (nothing is changed then).
    """
    rank, gpus = environ.get("MLX_RANK"), environ.get(ENV_RANK_GPUS)
    if rank is None or not gpus:
        return None
    table = gpus.split(",")
    try:
        gpu = table[int(rank)]
    except (ValueError, IndexError):
        return None
    if "mlx.core" in sys.modules and environ.get("CUDA_VISIBLE_DEVICES") != gpu:
        print(f"farense: warning: rank {rank}: mlx was imported before the rank's GPU ({gpu}) could be pinned",
              file=sys.stderr, flush=True)
    environ["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu


def spec_defaults_from_env(hosts: str | None, hostfile: str | None,
                           environ: dict[str, str] | os._Environ[str] = os.environ) -> tuple[str | None, str | None]:
    """--hosts/--hostfile, falling back to FARENSE_HOSTS/FARENSE_HOSTFILE (a work pool can set those)."""
    if hosts or hostfile:
        return hosts, hostfile
    return environ.get(ENV_HOSTS) or None, environ.get(ENV_HOSTFILE) or None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _ring_needs_ips(names: list[str]) -> str:
    return (f"the ring backend connects by IP address, and these hosts have none: {', '.join(sorted(set(names)))}. "
            "Give IPs (--hosts 10.0.0.1,10.0.0.2; 127.0.0.1 for ranks on this machine) or a --hostfile with "
            '{"ssh": "NAME", "ips": ["10.0.0.1"]} per host')


def _cuda_available() -> bool:
    try:
        import mlx.core as mx

        return bool(mx.cuda.is_available())
    except Exception:  # no mlx, or an mlx without the cuda module
        return False


# --------------------------------------------------------------------------- how the job ended

_RANK_EXIT = re.compile(rb"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")


def parse_rank_exit(line: bytes) -> tuple[int, int | None] | None:
    """mlx.launch's '[WARN] Node with rank 1 exited with code 9' -> (1, 9); 'was killed' -> (rank, None)."""
    m = _RANK_EXIT.search(line)
    if m is None:
        return None
    return int(m.group(1)), (int(m.group(2)) if m.group(2) is not None else None)


@dataclass
class JobOutcome:
    """What the launcher saw: each failed rank's code, whether we had to kill, how long it took."""

    exit_code: int
    rank_codes: dict[int, int | None]
    killed_after_timeout: bool
    stop_requested: bool
    seconds: float
    launcher_code: int | None = None  # mlx.launch's own exit status (0 unless it failed itself)

    def describe(self) -> str:
        if not self.rank_codes:
            return "every rank finished"
        parts = [f"rank {r}: " + ("killed" if c is None else f"exit {c}") for r, c in sorted(self.rank_codes.items())]
        if self.killed_after_timeout:
            parts.append("the rest killed after the time-out")
        return "; ".join(parts)


def supervise(argv: Sequence[str], *, world_size: int, rank_timeout: float,
              stop_requested: Callable[[], bool] = lambda: False,
              grace: float = LAUNCH_GRACE_SECONDS, death_grace: float = DEATH_GRACE_SECONDS,
              env: dict[str, str] | None = None,
              out: IO[bytes] | None = None, err: IO[bytes] | None = None,
              clock: Callable[[], float] = time.monotonic, poll: float = 0.2) -> JobOutcome:
    """Run mlx.launch and bound how the job ends.

    mlx.launch stops the other ranks when one fails, but it waits for them without limit and exits
    0 whatever happened. Here: its output is forwarded; the ranks' failures are read off it; a stop
    request (SIGTERM on us) is passed to every rank as a 'stop' line on stdin (they checkpoint and
    exit 75); and from the first failure or stop on, the job gets `rank_timeout + grace` seconds
    before its whole process group is killed, or `death_grace` seconds from a rank that was killed
    or lost (the survivors would only wait for it until their own time-out).
    """
    out = out or sys.stdout.buffer
    err = err or sys.stderr.buffer
    started = clock()
    proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env=env, preexec_fn=_die_with_us)
    codes: dict[int, int | None] = {}
    first_failure = threading.Event()
    first_death = threading.Event()

    def pump(src: IO[bytes], dst: IO[bytes], parse: bool) -> None:
        for line in iter(src.readline, b""):
            if parse:
                hit = parse_rank_exit(line)
                if hit is not None:
                    codes.setdefault(hit[0], hit[1])
                    if hit[1] != ExitCode.OK:
                        first_failure.set()
                    if died(hit[1]):
                        first_death.set()
            try:
                dst.write(line)
                dst.flush()
            except (OSError, ValueError):
                pass  # our own output is gone; keep draining so the launcher never blocks

    pumps = [threading.Thread(target=pump, args=(proc.stdout, out, False), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, err, True), daemon=True)]
    for t in pumps:
        t.start()
    deadline: float | None = None
    stopped = killed = death_seen = False
    try:
        while proc.poll() is None:
            if stop_requested() and not stopped:
                stopped = True
                _write_stop(proc)
            if deadline is None and (stopped or first_failure.is_set()):
                deadline = clock() + rank_timeout + min(grace, rank_timeout)
            if first_death.is_set() and not death_seen:
                death_seen = True
                deadline = min(deadline if deadline is not None else math.inf, clock() + death_grace)
            if deadline is not None and clock() > deadline:
                killed = True
                _kill_group(proc)
                proc.wait()
                break
            time.sleep(poll)
    finally:
        if proc.poll() is None:  # we are being torn down (KeyboardInterrupt, an error): take the job along
            _kill_group(proc)
            proc.wait()
        _kill_group(proc)  # leftovers: a local rank the launcher could not stop
        for t in pumps:
            t.join(timeout=5)
        with contextlib.suppress(OSError):
            proc.stdin.close()  # type: ignore[union-attr]
    if killed:
        for r in range(world_size):
            codes.setdefault(r, None)  # whoever had not ended was killed by us
    return JobOutcome(_launch_exit_code(codes, world_size, proc.returncode),
                      {r: c for r, c in codes.items() if c != ExitCode.OK}, killed, stopped, clock() - started,
                      launcher_code=proc.returncode)


def _launch_exit_code(codes: dict[int, int | None], world_size: int, launcher_code: int) -> int:
    """The job's code from its ranks' codes; when they say nothing, from mlx.launch's own exit."""
    code = job_exit_code(codes, world_size)
    if code == ExitCode.OK and launcher_code != 0:
        # mlx.launch exits 0 whatever its ranks did, so a failure here is its own: a bad host list
        # (argparse exits 2), or it was killed.
        code = ExitCode.BAD_INPUT if launcher_code == 2 else ExitCode.PREEMPTED if died(launcher_code) else ExitCode.FAILED
    return code


def _write_stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(OSError, ValueError):
        proc.stdin.write(STOP_LINE)  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _die_with_us() -> None:
    """In the launcher's child before exec: die with its parent (Linux), so no job outlives farense."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# =========================================================================== rank side


def world() -> Any:
    """This process's group (size 1 when not launched by mlx.launch); mlx caches it."""
    import mlx.core as mx

    return mx.distributed.init()


@contextlib.contextmanager
def rank_zero_lock(path: str | os.PathLike[str], *, command: str) -> Iterator[Any]:
    """The run lock, held by rank 0 only: other ranks on the same host would otherwise be refused."""
    if world().rank() != 0:
        yield None
        return
    with RunLock(path, command=command) as lock:
        yield lock


def collective_stream() -> Any:
    """The stream for the small collectives outside the compiled step (flags, losses, bytes).

    mlx-lm runs them on the CPU stream, which the ring and MPI backends need; NCCL runs on the GPU
    and refuses it ("There is no Stream(gpu, 0) in current thread"): there, the default stream.
    """
    import mlx.core as mx

    return mx.default_stream(mx.default_device()) if nccl_backend() else mx.cpu


def nccl_backend() -> bool:
    """This rank was started for NCCL (mlx.launch --backend nccl sets the NCCL rendezvous address)."""
    if "NCCL_HOST_IP" not in os.environ:
        return False
    import mlx.core as mx

    return bool(mx.distributed.is_available("nccl")) and mx.default_device() == mx.gpu


def broadcast_bytes(data: bytes | None, group: Any = None) -> bytes:
    """Rank 0's bytes on every rank (all_sum of rank 0's bytes and zeros: exact in integers)."""
    import mlx.core as mx
    import numpy as np

    group = group or world()
    if group.size() == 1:
        return data or b""
    mine = data if group.rank() == 0 else None
    stream = collective_stream()
    n = mx.distributed.all_sum(mx.array(len(mine or b""), dtype=mx.int64), group=group, stream=stream).item()
    if n == 0:
        return b""
    buf = mx.array(np.frombuffer(mine, dtype=np.uint8)) if mine is not None else mx.zeros((n,), dtype=mx.uint8)
    total = mx.distributed.all_sum(buf, group=group, stream=stream)
    return np.asarray(total).tobytes()


def share_checkpoint(info: Any, *, fingerprint: str, data_fingerprint: str, required_files: Sequence[str] = (),
                     group: Any = None, scratch: str | os.PathLike[str] | None = None) -> Any:
    """Every rank resumes from rank 0's choice, checked by every rank.

    Rank 0 passes the checkpoint it verified (or None: start from step 0) and broadcasts its
    config and data fingerprints, its manifest and its files; every other rank writes them into a
    private scratch directory (removed when the returned CheckpointInfo goes) and verifies them
    against the manifest there, as the store would. A rank whose config or data differ from rank
    0's refuses to start, and all ranks raise together, so none waits on it. Returns this rank's
    CheckpointInfo for the shared checkpoint, or None.
    """
    group = group or world()
    rank = group.rank()
    if group.size() == 1:
        return info
    header: dict[str, Any] = {"fingerprint": fingerprint, "data_fingerprint": data_fingerprint, "step": None}
    blob = b""
    if rank == 0 and info is not None:
        names = [MANIFEST_NAME, *info.files]
        parts = [(info.path / n).read_bytes() for n in names]
        header.update(step=info.step, files=[[n, len(p), hashlib.sha256(p).hexdigest()] for n, p in zip(names, parts)])
        blob = b"".join(parts)
    theirs = orjson.loads(broadcast_bytes(orjson.dumps(header) if rank == 0 else None, group))
    mismatch = [k for k in ("fingerprint", "data_fingerprint")
                if theirs[k] != {"fingerprint": fingerprint, "data_fingerprint": data_fingerprint}[k]]
    import mlx.core as mx

    bad = mx.distributed.all_sum(mx.array(1 if mismatch else 0, dtype=mx.int32), group=group,
                                 stream=collective_stream()).item()
    if bad:
        if mismatch:
            diffs = [f"{what} {mine} differs from rank 0's {theirs[key]}"
                     for key, what, mine in (("fingerprint", "config fingerprint", fingerprint),
                                             ("data_fingerprint", "data fingerprint", data_fingerprint))
                     if key in mismatch]
            raise FingerprintMismatch(f"rank {rank} does not run rank 0's training: its {' and its '.join(diffs)}. "
                                      "Every host must have the same config file and train/valid data.")
        raise FingerprintMismatch(f"{bad} rank(s) run a different config or data than rank 0 (see their messages); "
                                  "every host must have the same config file and train/valid data")
    data = broadcast_bytes(blob if rank == 0 else None, group)
    if theirs["step"] is None:
        return None
    if rank == 0:
        return info
    root = Path(tempfile.mkdtemp(prefix=f"farense-rank{rank}-", dir=scratch))
    target = root / checkpoint_name(int(theirs["step"]))
    target.mkdir()
    offset = 0
    for name, size, digest in theirs["files"]:
        part = data[offset:offset + size]
        offset += size
        if hashlib.sha256(part).hexdigest() != digest:
            shutil.rmtree(root, ignore_errors=True)
            raise PeerLost(f"rank {rank}: {name} of checkpoint step {theirs['step']} arrived damaged from rank 0")
        (target / name).write_bytes(part)
    shared = CheckpointStore(root, rank=rank, required_files=required_files).latest_verified()
    if shared is None or shared.step != theirs["step"]:
        shutil.rmtree(root, ignore_errors=True)
        raise PeerLost(f"rank {rank}: rank 0's checkpoint step {theirs['step']} does not verify here")
    weakref.finalize(shared, shutil.rmtree, root, True)
    return shared


def peer_lost(exc: BaseException) -> bool:
    """An error raised by a collective because another rank went away (ring: 'connection to a peer
    was lost'; MPI/NCCL report their own), as opposed to a bug or bad input."""
    if not isinstance(exc, RuntimeError):
        return False
    msg = str(exc).lower()
    return msg.startswith(("[ring]", "[mpi]", "[nccl]", "[jaccl]")) or "peer" in msg


class Watchdog:
    """Ends this rank as resumable (exit 75) when no step completes in time.

    A peer that dies with its sockets closed is noticed by the ring backend at once; one that hangs,
    or a host that vanishes, leaves a collective waiting forever. The trainer's loop beats after
    every step; until the first beat the longer start-up limit applies.
    """

    def __init__(self, timeout: float, startup_timeout: float, *, rank: int = 0,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
                 exit: Callable[[int], None] = os._exit, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout, self.startup_timeout, self.rank = timeout, startup_timeout, rank
        self._log, self._exit, self._clock = log, exit, clock
        self._last = clock()
        self._started = False  # a step has completed: the step limit applies
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def limit(self) -> float:
        return self.timeout if self._started else max(self.startup_timeout, self.timeout)

    def beat(self) -> None:
        """A step completed: progress, the peers are alive."""
        self._last = self._clock()
        self._started = True

    def expired(self) -> bool:
        return self._clock() - self._last > self.limit

    def check(self) -> bool:
        """Exit (resumable) if the limit passed; the thread calls this, tests call it directly."""
        if not self.expired():
            return False
        what = "step" if self._started else "start-up (connect, load, first step)"
        self._log(f"farense: rank {self.rank}: no progress for {self.limit:.0f} s during {what}: a peer rank is "
                  f"dead or hung; stopping as resumable (exit {int(ExitCode.PREEMPTED)}); the retry resumes from the "
                  "last checkpoint")
        self._exit(ExitCode.PREEMPTED)
        return True

    def start(self) -> "Watchdog":
        def run() -> None:
            while not self._stop.wait(min(1.0, self.timeout / 10)):
                if self.check():
                    return

        self._thread = threading.Thread(target=run, daemon=True, name="farense-rank-watchdog")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


def stop_on_stdin(request_stop: Callable[[], None], fd: int | None = None) -> threading.Thread:
    """Stop (checkpoint, exit 75) when the launcher says 'stop' on stdin or goes away (EOF).

    mlx.launch broadcasts its stdin to every rank, over ssh too: this is how a SIGTERM on the
    launching machine reaches ranks on other hosts. Reads the raw descriptor: a daemon thread
    blocked inside sys.stdin's buffered reader would abort the interpreter at exit.
    """
    fd = sys.stdin.fileno() if fd is None else fd

    def run() -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            pending += chunk
            lines = pending.split(b"\n")
            pending = lines.pop()
            if any(line.strip() == STOP_LINE.strip() for line in lines):
                request_stop()
                return
        request_stop()  # EOF: the launcher is gone; nobody would collect this job's result

    t = threading.Thread(target=run, daemon=True, name="farense-rank-stdin")
    t.start()
    return t
