"""`farense plot RUN`: the loss curves of a run as a PNG of the expected size, from the command line."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import orjson
import pytest

from farense.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which a valid PNG has first, right after the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run's metrics and summary as the trainer writes them: 60 steps, validation every 10, early stop."""
    run = tmp_path / "runs" / "v2"
    run.mkdir(parents=True)
    rows = []
    for step in range(1, 61):
        row = {"step": step, "train_loss": 2.5 * math.exp(-step / 25) + 0.4 + 0.05 * math.sin(step),
               "learning_rate": 2e-4}
        if step % 10 == 0:
            row.update(val_loss=2.4 * math.exp(-step / 30) + 0.6 + 0.002 * max(step - 40, 0) ** 2)
        rows.append(row)
    (run / "metrics.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    (run / "training_summary.json").write_bytes(orjson.dumps({
        "run_name": "v2", "best_step": 40, "best_val_loss": rows[39]["val_loss"], "train_val_gap": 0.11,
        "gap_status": "BOM", "early_stopped": True, "early_stop_step": 60,
    }))
    return run


def test_plot_writes_the_loss_curves_png_into_the_run(run, capsys):
    assert main(["plot", str(run)]) == 0
    png = run / "plots" / "loss_curves.png"
    assert capsys.readouterr().out.strip() == f"wrote {png}"
    assert png_size(png) == (1000, 600)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))
    assert pixels.shape[:2] == (600, 1000) and pixels.std() > 0.05, "a drawn figure, not a blank image"


def test_plot_to_a_chosen_file_with_json(run, tmp_path, capsys):
    out = tmp_path / "elsewhere" / "curves.png"
    assert main(["plot", str(run), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"plot": str(out)}
    assert png_size(out) == (1000, 600) and not list(out.parent.glob("*.tmp*"))


def test_plot_of_a_run_without_metrics_says_so(tmp_path, capsys):
    empty = tmp_path / "runs" / "empty"
    empty.mkdir(parents=True)
    (empty / "config.json").write_text("{}")
    assert main(["plot", str(empty)]) == 1
    assert "no metrics to plot" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nope")]) == 2, "neither a run directory nor a config name"


def test_plot_skips_lines_that_are_not_metrics_rows_naming_file_and_line(run, capsys):
    """Issue 13.7: torn, non-object and wrong-typed lines are skipped with a warning, never a traceback."""
    metrics = run / "metrics.jsonl"
    with metrics.open("ab") as f:
        f.write(b'[1,2,3]\n{"step":"abc"}\n{"step": 61, "train_loss": "x"}\n{"step": 62, "tra')
    assert main(["plot", str(run)]) == 0
    err = capsys.readouterr().err
    for line in (61, 62, 63, 64):
        assert f"{metrics}:{line}: skipped" in err
    assert "Traceback" not in err and png_size(run / "plots" / "loss_curves.png") == (1000, 600)
