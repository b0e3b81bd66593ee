"""farense.disk.diskguard and farense.disk.estimate: every watermark's action with an injected usage function,
hysteresis, flood writing nothing, a real tmpfs, the preflight, and the estimate against a real
checkpoint written by the trainer on the demo model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import orjson
import pytest

from farense.config import DiskConfig, ExperimentConfig, Size, load_config
from farense.disk.diskguard import (
    DiskGuard,
    Level,
    RunDiskGuard,
    Usage,
    disk_usage,
)
from farense.disk.estimate import ModelShape, checkpoint_sizes, estimate_run, side_by_side
from farense.disk.preflight import preflight, render_preflight
from farense.errors import DiskFull
from farense.run import fsutil
from farense.run.checkpoint import CheckpointStore, RetentionPolicy

REPO = Path(__file__).resolve().parent.parent
GB = 10**9
MB = 10**6
DEFAULTS = DiskConfig()  # low 85% / 20 GB, high 90% / 10 GB, flood 95% / 5 GB, reserve 1 GB, hysteresis 2


class FakeDisk:
    """A filesystem of `total` bytes whose usage the test sets, plus whatever `watch` holds on real disk."""

    def __init__(self, total: int, used: int, watch: Path | None = None) -> None:
        self.total, self.used, self.watch = total, used, watch
        self.calls: list[Path] = []

    def set_percent(self, percent: float) -> "FakeDisk":
        self.used = int(self.total * percent / 100)
        return self

    def __call__(self, path: Path) -> Usage:
        self.calls.append(Path(path))
        used = self.used + (fsutil.dir_size(self.watch) if self.watch else 0)
        return Usage(self.total, used, self.total - used)


def store_with(tmp_path: Path, steps: list[int], size: int = 100_000) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    for s in steps:
        store.save(s, {"adapters.safetensors": lambda p, s=s: p.write_bytes(bytes([s % 256]) * size)}, {"best_step": 200})
    return store


def steps(store: CheckpointStore) -> list[int]:
    return [i.step for i in store.list()]


def no_leftovers(store: CheckpointStore) -> bool:
    return not [p for p in store.directory.iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------------- levels, whichever is stricter


@pytest.mark.parametrize(
    ("total", "used_percent", "level", "why"),
    [
        (1000 * GB, 80.0, Level.OK, "200 GB free, 80%"),
        (1000 * GB, 86.0, Level.LOW, "percent: 86% >= 85% with 140 GB free"),
        (100 * GB, 82.0, Level.LOW, "absolute: 18 GB free < 20 GB at only 82%"),
        (1000 * GB, 91.0, Level.HIGH, "percent: 91% with 90 GB free"),
        (60 * GB, 84.0, Level.HIGH, "absolute: 9.6 GB free < 10 GB at only 84%"),
        (1000 * GB, 96.0, Level.FLOOD, "percent: 96% with 40 GB free"),
        (50 * GB, 91.0, Level.FLOOD, "absolute: 4.5 GB free < 5 GB at 91%"),
    ],
)
def test_level_is_the_stricter_of_percent_and_absolute(tmp_path: Path, total: int, used_percent: float,
                                                        level: Level, why: str) -> None:
    guard = DiskGuard(DEFAULTS, tmp_path, usage=FakeDisk(total, 0).set_percent(used_percent))
    reading = guard.check(next_write_bytes=0)
    assert reading.level is level, why
    assert reading.used_percent == pytest.approx(used_percent)


def test_flood_when_the_next_checkpoint_and_reserve_do_not_fit(tmp_path: Path) -> None:
    disk = FakeDisk(1000 * GB, 0).set_percent(70)  # 300 GB free: every threshold is far away
    guard = DiskGuard(DEFAULTS, tmp_path, usage=disk)
    assert guard.check(next_write_bytes=298 * GB).level is Level.OK
    reading = guard.check(next_write_bytes=299 * GB + 1)  # 299 GB + 1 GB reserve > 300 GB free
    assert reading.level is Level.FLOOD and reading.raw_level is Level.FLOOD
    assert "next checkpoint 299.0 GB + reserve 1.0 GB" in reading.message


def test_thresholds_are_configurable_in_percent_and_bytes(tmp_path: Path) -> None:
    cfg = DiskConfig(low_used_percent=50, low_free=Size(3 * MB), high_used_percent=60, high_free=Size(2 * MB),
                     flood_used_percent=70, flood_free=Size(1 * MB), reserve=Size(0))
    disk = FakeDisk(100 * MB, 0)
    guard = DiskGuard(cfg, tmp_path, usage=disk)
    assert DiskGuard(cfg, tmp_path, usage=disk.set_percent(55)).check().level is Level.LOW
    assert DiskGuard(cfg, tmp_path, usage=disk.set_percent(65)).check().level is Level.HIGH
    assert DiskGuard(cfg, tmp_path, usage=disk.set_percent(75)).check().level is Level.FLOOD
    small = FakeDisk(4 * MB, int(1.5 * MB))  # 37.5% used but 2.5 MB free < 3 MB
    assert DiskGuard(cfg, tmp_path, usage=small).check().level is Level.LOW
    assert guard.thresholds[Level.HIGH].describe() == "high at 60% used or < 2.0 MB free"


# ---------------------------------------------------------------------- hysteresis and pacing


def test_hysteresis_on_the_percentage(tmp_path: Path) -> None:
    disk = FakeDisk(1000 * GB, 0)
    guard = DiskGuard(DEFAULTS, tmp_path, usage=disk)
    levels = []
    for p in (86, 84, 83.5, 82.9, 91, 89, 87.9, 80):  # leave low below 83%, high below 88%
        disk.set_percent(p)
        levels.append(guard.check().level)
    assert levels == [Level.LOW, Level.LOW, Level.LOW, Level.OK, Level.HIGH, Level.HIGH, Level.LOW, Level.OK]


def test_hysteresis_on_the_absolute_threshold(tmp_path: Path) -> None:
    cfg = DiskConfig(low_used_percent=100, high_used_percent=100, flood_used_percent=100)  # absolute only
    disk = FakeDisk(100 * GB, 0)
    guard = DiskGuard(cfg, tmp_path, usage=disk)
    seen = []
    for free in (19, 21, 21.9, 22, 9.5, 11, 12, 30):  # margin: 2% of 100 GB = 2 GB
        disk.used = int(disk.total - free * GB)
        seen.append(guard.check().level)
    assert seen == [Level.LOW, Level.LOW, Level.LOW, Level.OK, Level.HIGH, Level.HIGH, Level.LOW, Level.OK]


def test_due_paces_periodic_checks_without_sleeping(tmp_path: Path) -> None:
    now = [1000.0]
    guard = DiskGuard(DiskConfig(check_interval_seconds=60), tmp_path, usage=FakeDisk(GB, 0), clock=lambda: now[0])
    assert guard.due() is True
    assert [guard.due(t) for t in (1030.0, 1059.9, 1060.0, 1100.0, 1120.0)] == [False, False, True, False, True]
    now[0] = 1200.0
    assert guard.due() is True


# ---------------------------------------------------------------------- each level's action


def test_ok_does_nothing(tmp_path: Path) -> None:
    store = store_with(tmp_path, [100, 200, 300, 400, 500])
    guard = DiskGuard(DEFAULTS, store.directory, usage=FakeDisk(1000 * GB, 0).set_percent(50))
    assert guard.enforce(guard.check(), store, RetentionPolicy(2), best_step=200) == []
    assert steps(store) == [100, 200, 300, 400, 500]


def test_low_warns_and_prunes_to_the_policy(tmp_path: Path) -> None:
    store = store_with(tmp_path, [100, 200, 300, 400, 500])
    guard = DiskGuard(DEFAULTS, store.directory, usage=FakeDisk(1000 * GB, 0).set_percent(86))
    actions = guard.enforce(guard.check(), store, RetentionPolicy(keep_last=2), best_step=200)
    assert [a.kind for a in actions] == ["warn", "prune"]
    assert actions[1].deleted_steps == (100, 300) and actions[1].bytes_freed == 200_000
    assert steps(store) == [200, 400, 500]


def test_high_prunes_to_latest_and_best_and_keeps_protected(tmp_path: Path) -> None:
    store = store_with(tmp_path, [100, 200, 300, 400, 500])
    guard = DiskGuard(DEFAULTS, store.directory, usage=FakeDisk(60 * GB, 0).set_percent(84))  # 9.6 GB free
    actions = guard.enforce(guard.check(), store, RetentionPolicy(keep_last=3), best_step=200, protect=[300])
    assert [a.kind for a in actions] == ["warn", "prune-to-minimum"]
    assert "DISK HIGH" in actions[0].message
    assert steps(store) == [200, 300, 500]


def test_flood_writes_nothing_and_raises_disk_full_with_the_numbers(tmp_path: Path) -> None:
    store = store_with(tmp_path, [100, 200, 300, 400, 500])
    log: list[str] = []
    guard = RunDiskGuard(DEFAULTS, store.directory.parent, policy=RetentionPolicy(3),
                         usage=FakeDisk(1000 * GB, 0).set_percent(96), log=log.append)
    with pytest.raises(DiskFull) as err:
        guard.before_write(store, 200_000, best_step=200)
    msg = str(err.value)
    assert "paused: disk full" in msg and "40.0 GB free (96.0% used)" in msg
    assert "flood level is 95% used or < 5.0 GB free" in msg and "reserve 1.0 GB" in msg
    assert f"farense cleanup --runs-dir {store.directory.parent.parent} --apply" in msg
    assert err.value.retryable and err.value.exit_code == 76 and err.value.free == 40 * GB
    assert log and "paused: disk full" in log[-1]
    # Nothing was written; only what prune_to_minimum may delete went, latest and best stay intact.
    assert steps(store) == [200, 500] and no_leftovers(store)
    assert store.verify(500) == (True, "ok") and store.verify(200) == (True, "ok")


def test_flood_recovers_when_pruning_frees_enough(tmp_path: Path) -> None:
    cfg = DiskConfig(low_used_percent=100, high_used_percent=100, flood_used_percent=100, low_free=Size(800_000),
                     high_free=Size(600_000), flood_free=Size(300_000), reserve=Size(0), hysteresis_percent=1)
    store = store_with(tmp_path, [100, 200, 300, 400, 500])  # 5 x 100 KB (+ manifests)
    disk = FakeDisk(10 * MB, int(9.3 * MB), watch=store.directory)  # 0.2 MB free: flood
    guard = DiskGuard(cfg, store.directory, usage=disk)
    reading = guard.check(100_000)
    assert reading.level is Level.FLOOD
    actions = guard.enforce(reading, store, RetentionPolicy(3), best_step=200)
    assert steps(store) == [200, 500]
    assert actions[-1].kind == "warn" and actions[-1].level is Level.HIGH and "after pruning" in actions[-1].message


def test_run_guard_for_config_takes_policy_and_estimate_from_the_config(tiny_config: ExperimentConfig) -> None:
    guard = RunDiskGuard.for_config(tiny_config, usage=FakeDisk(1000 * GB, 0))
    assert guard.policy == RetentionPolicy(keep_last=3, keep_best=True)
    assert guard.checkpoint_estimate == estimate_run(tiny_config).checkpoint_bytes > 0
    assert guard.path == tiny_config.run_dir and guard.config == tiny_config.disk


def test_run_guard_before_write_uses_the_estimate_until_a_checkpoint_exists(tmp_path: Path) -> None:
    disk = FakeDisk(1000 * GB, 0).set_percent(50)
    guard = RunDiskGuard(DEFAULTS, tmp_path / "run", checkpoint_estimate=3 * GB, usage=disk, log=lambda m: None)
    assert guard.before_write(CheckpointStore(tmp_path / "run" / "checkpoints"), 0, best_step=None).next_write_bytes == 3 * GB
    assert guard.periodic(CheckpointStore(tmp_path / "run" / "checkpoints"), 5, best_step=None).next_write_bytes == 5
    assert disk.calls == [tmp_path / "run", tmp_path / "run"]


# ---------------------------------------------------------------------- a real tmpfs


@pytest.fixture
def tmpfs_4m(mount_tmpfs):
    """A 4m tmpfs, or a skip that says why there is none."""
    return mount_tmpfs("4m")


def test_statvfs_usage_on_a_real_tmpfs_reaches_flood_before_enospc(tmpfs_4m: Path) -> None:
    u = disk_usage(tmpfs_4m / "not" / "created" / "yet")
    assert u.total == 4 * 1024 * 1024 and u.used == 0 and u.free == u.total
    cfg = DiskConfig(low_free=Size(2 * MB), high_free=Size(1 * MB), flood_free=Size(500_000), reserve=Size(100_000))
    store = CheckpointStore(tmpfs_4m / "run" / "checkpoints")
    guard = RunDiskGuard(cfg, tmpfs_4m / "run", policy=RetentionPolicy(1), log=lambda m: None)
    sizes = []
    with pytest.raises(DiskFull):
        for step in range(1, 100):
            # Every earlier step protected (say, all pinned): pruning cannot help, the disk fills.
            guard.before_write(store, store.last_checkpoint_size() or 0, best_step=1, protect=range(step))
            store.save(step, {"w.bin": lambda p: p.write_bytes(os.urandom(700_000))}, {})
            sizes.append(step)
    # The guard stopped the run before the disk refused a write: every checkpoint is whole.
    assert len(sizes) >= 3 and no_leftovers(store)
    assert all(store.verify(i)[0] for i in store.list())
    assert guard.readings[-1].level is Level.FLOOD and guard.readings[-1].free >= 0


# ---------------------------------------------------------------------- the estimate


def test_lora_estimate_matches_mlx_lm_exactly_for_dora_and_qlora(tmp_path: Path) -> None:
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from farense.config import LoraConfig

    hf = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 256,
          "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 512,
          "tie_word_embeddings": False}
    shape = ModelShape.from_config(hf)
    for lora, quantize in (
        (LoraConfig(rank=8, num_layers=-1), False),
        (LoraConfig(type="dora", rank=4, num_layers=2, keys=["self_attn.q_proj", "mlp.down_proj"]), False),
        (LoraConfig(rank=6, num_layers=3), True),
    ):
        model = llama.Model(llama.ModelArgs(**hf))
        assert sum(v.size for _, v in tree_flatten(model.parameters())) == shape.parameter_count()
        if quantize:
            nn.quantize(model, group_size=64, bits=4)
        model.freeze()
        params = {"rank": lora.rank, "scale": 20.0, "dropout": 0.0}
        if lora.keys:
            params["keys"] = list(lora.keys)
        linear_to_lora_layers(model, lora.num_layers, params, use_dora=lora.type == "dora")
        real = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        assert checkpoint_sizes(shape, lora)[0] == real, lora


def test_estimate_is_within_10_percent_of_a_real_checkpoint(make_config: Callable[..., ExperimentConfig]) -> None:
    """The trainer writes a real checkpoint of the demo model; the guard saw the estimate first."""
    from farense.train.runner import run_training

    cfg = make_config(training={"iters": 2, "warmup_steps": 0}, validation={"every_steps": 2},
                      checkpoint={"every_steps": 2, "keep_last": 1})
    est = estimate_run(cfg)
    assert est.checkpoint_bytes is not None and est.notes == ()
    guard = RunDiskGuard(cfg.disk, cfg.run_dir, policy=RetentionPolicy(1), checkpoint_estimate=est.checkpoint_bytes,
                         usage=FakeDisk(1000 * GB, 0).set_percent(50), log=lambda m: None)
    run_training(cfg, guard=guard, log=lambda m: None, progress_bar=False)
    assert guard.readings and guard.readings[0].next_write_bytes == est.checkpoint_bytes

    info = CheckpointStore(cfg.run_dir / "checkpoints").list()[-1]
    real = sum(p.stat().st_size for p in info.path.iterdir())  # every file, MANIFEST.json included
    assert abs(est.checkpoint_bytes - real) / real < 0.10, (est.checkpoint_bytes, real)
    assert abs(est.adapter_bytes - info.file("adapters.safetensors").stat().st_size) / est.adapter_bytes < 0.01
    assert abs(est.optimizer_bytes - info.file("optimizer.safetensors").stat().st_size) / est.optimizer_bytes < 0.01
    assert est.checkpoints_on_disk == 1 + 1 + 1  # keep_last + best + the one being written


# ---------------------------------------------------------------------- the preflight


@pytest.fixture
def tiny_config(tmp_path: Path) -> ExperimentConfig:
    """V2 on a model directory that has only a config.json (the preflight never loads weights)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes(orjson.dumps({
        "model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32768,
        "torch_dtype": "bfloat16", "quantization": {"group_size": 64, "bits": 4}}))
    cfg = load_config("v2", workspace=tmp_path)
    return cfg.with_overrides(model={"path": str(model)}, data={"dir": str(tmp_path / "data")})


def test_preflight_estimates_mistral_7b_qlora_and_prints_a_table(tiny_config: ExperimentConfig) -> None:
    est = estimate_run(tiny_config)
    # V2: rank 6 on q,k,v,o of the last 16 of 32 blocks: 16 x 6 x (2x(4096+4096) + 2x(4096+1024)) = 2,555,904
    assert est.lora_parameters == 2_555_904
    assert 30 * MB < est.checkpoint_bytes < 32 * MB  # 3 x 4 bytes x 2.56 M + metadata
    assert 3.5 * GB < est.model_memory_bytes < 4.5 * GB  # 7.2 B parameters in 4-bit
    report = preflight(tiny_config, usage=FakeDisk(1000 * GB, 0).set_percent(50),
                       memory=lambda: SimpleNamespace(available=2 * GB, total=8 * GB))
    assert report.ok and report.cleanup is None
    assert any("memory: the model's weights need about" in w for w in report.warnings)
    text = render_preflight(report)
    assert "| filesystem | needs | free | cleanup could free | verdict |" in text
    assert "checkpoints" in text and "500.0 GB" in text and "ok" in text
    # "needs X" is shown as the rows that make it: every item, then what must stay free.
    (row,) = report.rows
    assert sum(b or 0 for _, b, _ in row.needs()) == row.needed
    assert row.needs()[-1][1] == row.headroom == max(row.reserve, row.flood_floor)
    assert preflight_table_adds_up(text) == [row.needed]


def test_runs_trained_side_by_side_are_counted_together_shared_files_once(tiny_config: ExperimentConfig) -> None:
    """A campaign's runs training at the same time: each one's checkpoints, adapters and metrics count,
    the model they share once, and their memory adds up (so the same disk that fits one may not fit two)."""
    other = load_config("v1", workspace=tiny_config.workspace).with_overrides(
        model={"path": tiny_config.model.path}, data={"dir": str(tiny_config.data_dir)})
    alone = estimate_run(tiny_config)
    together = side_by_side(alone, [("v1", estimate_run(other))])
    own = {i.name for i in alone.items}
    assert {i.name for i in together.items} == own | {f"v1: {n}" for n in own if n != "release"}
    theirs = estimate_run(other)  # the release (one production directory) is counted once, as this run's
    assert together.total_bytes == alone.total_bytes + theirs.total_bytes - next(
        i.bytes for i in theirs.items if i.name == "release")
    assert together.model_memory_bytes == 2 * alone.model_memory_bytes
    memory = lambda: SimpleNamespace(available=64 * GB, total=64 * GB)  # noqa: E731
    # A disk with room for one run's writes (plus the flood level) but not for both.
    need_one = alone.total_bytes + 5 * GB
    disk = FakeDisk(100 * GB, 100 * GB - need_one - 10 * MB)
    assert preflight(tiny_config, usage=disk, memory=memory, allow_cleanup=False).ok
    with pytest.raises(DiskFull) as err:
        preflight(tiny_config, usage=disk, memory=memory, allow_cleanup=False, alongside=[other])
    assert "v1: checkpoints" in render_preflight(err.value.report)


def preflight_table_adds_up(markdown: str) -> list[int]:
    """The total of each "What the run needs" table of a rendered preflight, checked against its rows."""
    totals = []
    for table in markdown.split("### What the run needs on ")[1:]:
        cells = [[c.strip(" *") for c in line.strip("|").split("|")] for line in table.splitlines()
                 if line.startswith("| ") and not line.startswith("| what ")]
        values = [int(c[2].replace(",", "")) for c in cells]
        assert cells[-1][0] == "needs (total)" and sum(values[:-1]) == values[-1], table
        totals.append(values[-1])
    return totals


def old_checkpoints(runs: Path, n: int, size: int) -> None:
    store = CheckpointStore(runs / "old-run" / "checkpoints")
    for s in range(1, n + 1):
        store.save(s, {"adapters.safetensors": lambda p: p.write_bytes(b"x" * size)}, {"best_step": None})


def test_preflight_runs_the_cleanup_policy_when_short_then_passes(tiny_config: ExperimentConfig) -> None:
    old_checkpoints(tiny_config.runs_dir, 10, 2 * MB)  # 7 beyond keep_last=3
    need = estimate_run(tiny_config).total_bytes + 5 * GB + 1  # everything on one filesystem + the flood level
    # 20 MB of checkpoints on disk leave it short by 10 MB, until the cleanup removes 14 MB of them.
    base = 100 * GB - need + 10 * MB - 20 * MB
    disk = FakeDisk(100 * GB, base, watch=tiny_config.runs_dir)
    report = preflight(tiny_config, usage=disk, now=0.0, memory=lambda: SimpleNamespace(available=64 * GB, total=64 * GB))
    assert report.cleanup is not None and report.cleanup.bytes_freed >= 14 * MB
    assert report.ok and len(CheckpointStore(tiny_config.runs_dir / "old-run" / "checkpoints").list()) == 3


def test_preflight_refuses_to_start_with_the_numbers_and_the_command(tiny_config: ExperimentConfig) -> None:
    old_checkpoints(tiny_config.runs_dir, 4, 1 * MB)
    disk = FakeDisk(100 * GB, 0).set_percent(97)
    with pytest.raises(DiskFull) as err:
        preflight(tiny_config, usage=disk, allow_cleanup=False, memory=lambda: SimpleNamespace(available=GB, total=GB))
    msg = str(err.value)
    assert "not enough disk space to start v2" in msg and "3.0 GB free" in msg and "short by" in msg
    assert f"farense cleanup --runs-dir {tiny_config.runs_dir}" in msg and "--apply" in msg
    assert "cleanup could free 1.0 MB more" in msg
    report = err.value.report
    assert not report.ok and report.rows[0].verdict == "short"
    assert len(CheckpointStore(tiny_config.runs_dir / "old-run" / "checkpoints").list()) == 4  # not allowed: untouched


def test_cli_preflight_exit_codes(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes(orjson.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                                      "num_attention_heads": 4, "vocab_size": 100}))
    cfgfile = tmp_path / "exp.toml"
    cfgfile.write_text(f'extends = "{REPO / "configs" / "v2.toml"}"\n[model]\npath = "{model}"\n'
                       f'[data]\ndir = "{tmp_path}"\n')
    run = [sys.executable, "-m", "farense", "--workspace", str(tmp_path), "preflight", str(cfgfile)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([*run, "--json"], capture_output=True, text=True, env=env, cwd=tmp_path)
    if ok.returncode == 76:  # this machine's disk is itself above the flood level
        pytest.skip(reason=f"the test machine's disk is too full for a passing preflight: {ok.stderr.strip()}")
    assert ok.returncode == 0, ok.stderr
    report = orjson.loads(ok.stdout)
    assert report["ok"] and report["estimate"]["lora_parameters"] > 0
    strict = tmp_path / "strict.toml"
    strict.write_text(cfgfile.read_text() + '[disk]\nreserve = "999TB"\n')
    out = subprocess.run([*run[:-1], str(strict), "--no-cleanup"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 76 and "not enough disk space" in out.stderr and "needs (total)" in out.stdout
