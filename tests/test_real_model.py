"""The real demo model end to end: SmolLM2-135M-Instruct (4-bit GGUF fetched with pip, imported),
V1 and V2 as a campaign through `farense run`, a few steps each on the CPU.

What it shows: fine-tuning lowers the loss of a real pretrained model on the Farense data, the
adapters load in plain mlx-lm, and the campaign decides by the seed's rules. The fast tests keep
the tiny random model; this is the one slow test on the real one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect_harness import seeded_prefect_home

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_campaign_on_the_real_model_lowers_the_loss_and_decides(smollm2_demo: Path) -> None:
    ws = smollm2_demo.parent.parent
    configs = []
    for name in ("v1", "v2"):
        path = ws / f"short-{name}.toml"
        path.write_text(f'extends = ["{REPO}/configs/{name}.toml", "{REPO}/configs/overlays/demo.toml"]\n'
                        f'name = "{name}"\n[training]\nepochs = 0\niters = 6\nwarmup_steps = 1\n'
                        # LoRA on the last 4 blocks and a quarter of the validation split: the same
                        # pipeline on the same model in a third of the demo's compute per step.
                        "[lora]\nnum_layers = 4\n"
                        "[validation]\nevery_steps = 3\nbatches = 2\n[checkpoint]\nevery_steps = 3\n"
                        "[evaluation]\nmax_examples = 4\nmax_new_tokens = 16\nbatch_size = 4\n")
        configs.append(str(path))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(seeded_prefect_home(ws / "prefect-home")), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               FARENSE_TRAINING_LOCK=str(ws / "training.lock"))
    proc = subprocess.run([sys.executable, "-m", "farense", "--workspace", str(ws), "run", *configs],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    # The run's log says how the CPU computes: the 4-bit base dequantized to fp32 once at load.
    assert "compute: base dequantized, float32" in proc.stderr

    runs = ws / "runs" / "demo"
    campaign = json.loads((runs / "campaign.json").read_text())
    rows = {row[0]: row for row in campaign["table"]["rows"]}
    assert set(rows) == {"base model (no adapters)", "v1", "v2"}
    base_loss = json.loads((runs / ".base-model" / "evaluation_report.json").read_text())["summary"]["test_loss"]
    for name in ("v1", "v2"):
        report = json.loads((runs / name / "evaluation" / "evaluation_report.json").read_text())
        assert report["summary"]["test_loss"] < base_loss, (name, report["summary"]["test_loss"], base_loss)
    v1_val = [r["val_loss"] for r in map(json.loads, (runs / "v1" / "metrics.jsonl").read_text().splitlines())
              if r.get("val_loss") is not None]
    assert len(v1_val) == 2 and v1_val[-1] < v1_val[0]
    assert campaign["verdict"] and len(campaign["reasons"]) == 2 and "decision:" in proc.stdout

    # The adapters load in plain mlx-lm over the 4-bit imported model, as they are.
    from mlx_lm import generate, load

    model, tokenizer = load(str(smollm2_demo / "model"), adapter_path=str(runs / "v1" / "adapters"))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Qual é o estádio do Farense?"}],
                                           add_generation_prompt=True, tokenize=False)
    assert generate(model, tokenizer, prompt=prompt, max_tokens=8).strip()
