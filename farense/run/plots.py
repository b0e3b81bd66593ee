"""PNG plots of a run: loss curves with the best step and early stop marked, and the per-example F1.

matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so plotting
works headless and never changes the state of a caller that uses matplotlib itself. Files are
written atomically.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from farense.run.fsutil import atomic_write_bytes

SIZE_INCHES = (10.0, 6.0)
DPI = 100  # 1000 x 600 px


def _figure() -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Any, out_png: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_png, buf.getvalue())
    return out_png


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss_curves(metrics_rows: Iterable[Mapping[str, Any]], summary: Mapping[str, Any] | None, out_png: Path) -> Path:
    """Train loss per step (raw and smoothed), validation loss, the best step and the early stop."""
    rows = [r for r in metrics_rows if _finite(r.get("step"))]
    summary = summary or {}
    fig, ax = _figure()
    train = [(r["step"], r["train_loss"]) for r in rows if _finite(r.get("train_loss"))]
    val = [(r["step"], r["val_loss"]) for r in rows if _finite(r.get("val_loss"))]
    if train:
        xs, ys = zip(*train)
        window = max(1, len(ys) // 30)
        ax.plot(xs, ys, color="tab:blue", alpha=0.3 if window > 1 else 1.0, linewidth=1,
                label="train loss" if window == 1 else "train loss (per step)")
        if window > 1:
            ax.plot(xs, _moving_average(ys, window), color="tab:blue", linewidth=2,
                    label=f"train loss (mean of {window} steps)")
    if val:
        xs, ys = zip(*val)
        ax.plot(xs, ys, color="tab:orange", marker="o", markersize=4, linewidth=2, label="validation loss")
    best = summary.get("best_step")
    if _finite(best):
        text = f"best step {best}"
        if _finite(summary.get("best_val_loss")):
            text += f" (val {summary['best_val_loss']:.3f})"
        ax.axvline(best, color="tab:green", linestyle="--", linewidth=1.5, label=text)
    stop = summary.get("early_stop_step")
    if summary.get("early_stopped") and _finite(stop):
        ax.axvline(stop, color="tab:red", linestyle=":", linewidth=2, label=f"early stop at step {stop}")
    name = summary.get("run_name", "")
    title = f"{name}: train and validation loss" if name else "Train and validation loss"
    gap = summary.get("train_val_gap")
    if _finite(gap):
        title += f"\ngap at best step {gap:.3f} ({summary.get('gap_status', '?')})"
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss (cross-entropy per token)")
    ax.grid(True, alpha=0.3)
    if train or val:
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no metrics recorded", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, out_png)


def plot_f1_distribution(
    rows: Iterable[Mapping[str, Any]], out_png: Path, *, title: str | None = None, threshold: float | None = None
) -> Path:
    """Histogram of per-example token F1, with the mean (and the production threshold) marked."""
    f1s = [float(r["f1"]) for r in rows if _finite(r.get("f1"))]
    fig, ax = _figure()
    bins = [i / 20 for i in range(21)]
    if f1s:
        ax.hist(f1s, bins=bins, color="tab:blue", edgecolor="white")
        mean = sum(f1s) / len(f1s)
        ax.axvline(mean, color="tab:green", linestyle="--", linewidth=2, label=f"mean F1 {mean:.4f}")
        if threshold is not None:
            ax.axvline(threshold, color="tab:red", linestyle=":", linewidth=2, label=f"production threshold {threshold}")
        ax.legend(loc="upper left")
    else:
        ax.text(0.5, 0.5, "no scored examples", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0, 1)
    ax.set_xlabel("token F1 (per example)")
    ax.set_ylabel("examples")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{title or 'Per-example F1'} (n={len(f1s)})")
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, out_png)
