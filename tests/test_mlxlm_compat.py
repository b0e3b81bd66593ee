"""mlx-lm compatibility: importing `mlx_lm.lora` YAML configs, and exporting adapters / fused models.

The real test imports a YAML for the demo model, shows that it has the fingerprint of the hand-written
farense TOML with the same settings, trains it, fuses it with `farense export --fuse` and loads the
result with mlx_lm; mlx-lm's own `generate --adapter-path` and `fuse` read the run's adapters.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from farense.cli import main
from farense.config import load_config
from farense.errors import ConfigError
from farense.model.mlxlm_compat import (
    EXPORT_RECORD,
    GRPO_KEYS,
    KEY_RULES,
    MLX_LM_DEFAULTS,
    import_lora_config,
    import_lora_yaml,
    read_yaml,
)

pytestmark = pytest.mark.timeout(300)

DEMO_YAML = """\
# An mlx-lm config, as `mlx_lm.lora -c lora.yaml` reads it, for the demo model.
model: "{demo}/model"
train: true
data: "{demo}/data"
fine_tune_type: lora
optimizer: adamw
optimizer_config:
  adamw:
    weight_decay: 0.02
seed: 7
num_layers: -1
batch_size: 2
grad_accumulation_steps: 2
iters: 16              # micro-batches: 8 optimizer steps
val_batches: 2
learning_rate: 3e-4
steps_per_report: 2
steps_per_eval: 8      # every 4 optimizer steps
save_every: 8
adapter_path: "adapters"
resume_adapter_file: null
test: false
test_batches: 10
max_seq_length: 128
grad_checkpoint: false
mask_prompt: true
report_to: null
lora_parameters:
  rank: 4
  scale: 10.0
  dropout: 0.05
lr_schedule:
  name: cosine_decay
  warmup: 2
  warmup_init: 0.0
  arguments: [3e-4, 6, 3e-6]
"""

HAND_WRITTEN = """\
name = "handwritten"

[model]
path = "{demo}/model"

[data]
dir = "{demo}/data"

[lora]
type = "lora"
rank = 4
scale = 10.0
dropout = 0.05
num_layers = -1

[training]
batch_size = 2
grad_accumulation = 2
iters = 8
learning_rate = 3e-4
schedule = "cosine"
warmup_steps = 2
min_learning_rate = 3e-6
optimizer = "adamw"
weight_decay = 0.02
max_seq_length = 128
seed = 7
mask_prompt = true

[validation]
every_steps = 4
batches = 2

[checkpoint]
every_steps = 4
"""


def test_the_defaults_and_key_table_cover_what_the_installed_mlx_lm_documents():
    from mlx_lm import lora

    assert MLX_LM_DEFAULTS == lora.CONFIG_DEFAULTS
    parser_keys = {a.dest for a in lora.build_parser()._actions if not isinstance(a, argparse._HelpAction)}
    lora_md_keys = {"hf_dataset", "chat_feature", "prompt_feature", "completion_feature", "text_feature"}
    # documented by other mlx-lm versions: examples/lora_config.yaml (training_mode and GRPO), the older wandb
    other_versions = {"training_mode", "wandb", *GRPO_KEYS}
    assert set(KEY_RULES) == set(lora.CONFIG_DEFAULTS) | parser_keys | lora_md_keys | other_versions


NEWER_YAML = """\
model: m
data: d
iters: 20
fine_tune_type: lora
training_mode: "normal"
optimizer: adamw
# GRPO settings, which mlx-lm ignores in normal mode
group_size: 4
beta: 0.1
epsilon: 1e-4
max_completion_length: 512
use_chat_template: true
use_prompt: false
temperature: 0.8
reference_model_path: "mlx_model"
system_feature: "system"
wandb: null
"""


def test_keys_newer_mlx_lm_documents_are_accepted_when_they_mean_what_farense_does(tmp_path):
    p = tmp_path / "newer.yaml"
    p.write_text(NEWER_YAML)
    imp = import_lora_yaml(p)
    assert imp.data["training"]["iters"] == 20 and imp.data["training"]["optimizer"] == "adamw"
    assert any(n.startswith("group_size: ignored unless training_mode is grpo") for n in imp.notes), imp.notes


@pytest.mark.parametrize("extra,expected", [
    ("training_mode: grpo\n", "training_mode: 'grpo' is not supported"),
    ("training_mode: dpo\n", "training_mode: 'dpo' is not supported"),
    ("wandb: my-project\n", "wandb: mlx-lm's older name for report_to"),
    ("training_mode: 3\n", "training_mode: expected a string, got int 3"),
])
def test_keys_newer_mlx_lm_documents_are_refused_naming_the_value(tmp_path, extra, expected):
    p = tmp_path / "newer.yaml"
    p.write_text("model: m\ndata: d\niters: 20\n" + extra)
    with pytest.raises(ConfigError) as e:
        import_lora_yaml(p)
    assert expected in str(e.value), str(e.value)
    assert extra.split(": ")[1].strip() in str(e.value)


@pytest.mark.parametrize("content", [b"model: m\ndata: caf\xe9\n", None])
def test_an_unreadable_yaml_is_a_config_error(tmp_path, capsys, content):
    p = tmp_path / "c.yaml"
    if content is None:
        p.mkdir()
    else:
        p.write_bytes(content)
    assert main(["config", "import", str(p)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(p) in err and ("not UTF-8" in err or "cannot read" in err), err


def test_yaml_numbers_read_as_mlx_lm_reads_them(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("learning_rate: 1e-5\nlr_schedule: {name: cosine_decay, arguments: [2e-4, 100, 1e-7]}\n")
    doc = read_yaml(p)
    assert doc["learning_rate"] == 1e-5 and doc["lr_schedule"]["arguments"] == [2e-4, 100, 1e-7]


def test_micro_batches_become_optimizer_steps_and_mlx_lm_defaults_fill_the_rest():
    imp = import_lora_config({"model": "m", "data": "d", "iters": 1000, "grad_accumulation_steps": 4,
                              "steps_per_eval": 200, "save_every": 100, "optimizer": "adamw"}, name="x")
    t, v, c, lora = imp.data["training"], imp.data["validation"], imp.data["checkpoint"], imp.data["lora"]
    assert (t["iters"], t["grad_accumulation"], v["every_steps"], c["every_steps"]) == (250, 4, 50, 25)
    # What mlx-lm would have used for the keys the YAML leaves out, not farense's own defaults.
    assert (t["batch_size"], t["learning_rate"], t["schedule"], t["max_seq_length"], v["batches"]) == (
        4, 1e-5, "constant", 2048, 25)
    assert (lora["rank"], lora["scale"], lora["dropout"], lora["num_layers"], lora["keys"]) == (8, 20.0, 0.0, 16, [])
    assert t["weight_decay"] == 0.01, "mlx's AdamW default, which mlx-lm gets by passing nothing"
    assert imp.data["early_stopping"]["patience"] == 0


def test_intervals_longer_than_the_run_are_clamped_with_a_note():
    imp = import_lora_config({"model": "m", "data": "d", "iters": 30}, name="x")
    assert imp.data["validation"]["every_steps"] == 30 and imp.data["checkpoint"]["every_steps"] == 30
    assert any("steps_per_eval" in n and "more than the run's 30" in n for n in imp.notes)


def test_every_problem_is_reported_at_once_with_the_way_out(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(
        "lora_rank: 4\nbatch_sise: 3\niters: '10'\nfine_tune_type: full\noptimizer: sgd\n"
        "lora_parameters: {rank: 8, alpha: 16, dropout: 0.0}\n"
        "lr_schedule: {name: exponential_decay, arguments: [1e-5, 0.9]}\n"
        "resume_adapter_file: old/adapters.safetensors\nreport_to: wandb\nhf_dataset: {path: billsum}\n"
        "optimizer_config: {adamW: {}}\n"
    )
    with pytest.raises(ConfigError) as e:
        import_lora_yaml(p)
    msg = str(e.value)
    for expected in (
        "lora_rank: not an mlx-lm lora option; LoRA settings go under lora_parameters",
        "batch_sise: not an mlx-lm lora option (did you mean 'batch_size'?)",
        "iters: expected an integer, got str '10'",
        "fine_tune_type: 'full'",
        "farense trains with adam or adamw, got 'sgd'",
        "lora_parameters.scale: missing",
        "mlx-lm's LoRA config uses 'scale'",
        "lr_schedule.name: farense supports cosine_decay and linear_schedule",
        "resume_adapter_file: farense resumes from its own checkpoints",
        "report_to: farense does not report to wandb",
        "hf_dataset:",
        "data: missing; mlx-lm's default is the Hugging Face dataset",
    ):
        assert expected in msg, expected
    assert str(p) in msg


def test_settings_farense_cannot_honour_are_refused_not_dropped():
    base = {"model": "m", "data": "d", "iters": 100, "optimizer": "adam"}
    with pytest.raises(ConfigError, match=r"optimizer_config.adam.betas: farense uses mlx's default"):
        import_lora_config({**base, "optimizer_config": {"adam": {"betas": [0.9, 0.98]}}}, name="x")
    with pytest.raises(ConfigError, match=r"warmup_init: farense warms up from 0"):
        import_lora_config({**base, "lr_schedule": {"name": "cosine_decay", "arguments": [1e-5, 100],
                                                    "warmup": 10, "warmup_init": 1e-6}}, name="x")
    with pytest.raises(ConfigError, match=r"lora.rank: expected an integer >= 1, got 0 \(after mapping"):
        import_lora_config({**base, "lora_parameters": {"rank": 0, "scale": 1.0, "dropout": 0.0}}, name="x")


def test_config_import_command_prints_or_writes_toml(tmp_path, capsys):
    y = tmp_path / "my lora.yaml"
    y.write_text("model: m\ndata: d\niters: 20\nlearning_rate: 2e-5\n")
    assert main(["config", "import", str(y)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Imported from mlx-lm config") and 'name = "my-lora"' in out
    out_file = tmp_path / "imported.toml"
    assert main(["config", "import", str(y), "--name", "exp", "--out", str(out_file)]) == 0
    assert load_config(out_file, workspace=tmp_path).training.learning_rate == 2e-5
    assert main(["config", "import", str(y), "--out", str(out_file)]) == 1, "never overwrites without --force"
    (tmp_path / "bad.yaml").write_text("itres: 5\n")
    assert main(["config", "import", str(tmp_path / "bad.yaml")]) == 2
    assert "did you mean 'iters'?" in capsys.readouterr().err


def test_imported_yaml_trains_to_the_hand_written_fingerprint_and_exports_for_mlx_lm(demo_dir, tmp_path, monkeypatch):
    y = tmp_path / "lora.yaml"
    y.write_text(DEMO_YAML.format(demo=demo_dir))
    imported = tmp_path / "imported.toml"
    assert main(["config", "import", str(y), "--out", str(imported)]) == 0
    hand = tmp_path / "handwritten.toml"
    hand.write_text(HAND_WRITTEN.format(demo=demo_dir))
    cfg = load_config(imported, workspace=tmp_path)
    assert cfg.fingerprint == load_config(hand, workspace=tmp_path).fingerprint

    from farense.train.runner import run_training

    result = run_training(cfg, progress_bar=False, log=lambda m: None)
    run = Path(result.run_dir)
    assert result.step == result.total_steps == 8
    assert orjson.loads((run / "training_summary.json").read_bytes())["fingerprint"] == cfg.fingerprint

    # farense export --fuse: a standalone model that mlx-lm loads, and whose logits are the adapted model's.
    fused = tmp_path / "fused"
    assert main(["export", str(run), "--fuse", "--out", str(fused)]) == 0
    assert not list(tmp_path.glob("fused.tmp-*"))
    record = orjson.loads((fused / EXPORT_RECORD).read_bytes())
    assert record["fused"] is True and record["farense_fingerprint"] == cfg.fingerprint
    import mlx.core as mx
    from mlx_lm import generate, load

    fused_model, tok = load(str(fused))
    adapted, _ = load(str(demo_dir / "model"), adapter_path=str(run / "adapters"))
    ids = mx.array([tok.encode("Onde joga o Farense?")])
    assert mx.allclose(fused_model(ids), adapted(ids), atol=1e-4).item()
    assert isinstance(generate(fused_model, tok, prompt="Onde joga o Farense?", max_tokens=5), str)
    assert main(["export", str(run), "--fuse", "--out", str(fused)]) == 1, "never overwrites without --force"

    # Adapters-only export keeps mlx-lm's layout.
    assert main(["export", str(run), "--out", str(tmp_path / "adapters-copy")]) == 0
    assert {p.name for p in (tmp_path / "adapters-copy").iterdir()} >= {"adapters.safetensors", "adapter_config.json"}

    # mlx-lm's own fuse reads the run's adapters.
    from mlx_lm import fuse

    monkeypatch.setattr(sys, "argv", ["mlx_lm.fuse", "--model", str(demo_dir / "model"), "--adapter-path",
                                      str(run / "adapters"), "--save-path", str(tmp_path / "mlx-fused")])
    fuse.main()
    assert (tmp_path / "mlx-fused" / "model.safetensors").is_file()

    # And mlx_lm generate --adapter-path, as a person would type it.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", str(demo_dir / "model"), "--adapter-path",
         str(run / "adapters"), "--prompt", "Onde joga o Farense?", "--max-tokens", "5"],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
