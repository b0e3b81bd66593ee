"""Evaluation of a run's best adapters on the test split, as the seed did by hand, automated.

One model load, then:
  - test loss (token-weighted cross-entropy, mlx-lm's loss, the answer tokens only when the run
    masked the prompt) and its perplexity;
  - greedy, batched generation (mlx-lm's batch_generate) from each chat prompt, scored against the
    reference answer with exact match and token precision / recall / F1 (farense.release.textmetrics).

Files, in run/evaluation/: loss_curves.png, f1_distribution.png, evaluation_summary.csv, then
evaluation_report.json last (its presence means the evaluation is complete). The report carries
its own fingerprint: the SHA-256 of its canonical JSON (sorted keys, no indentation) without the
"fingerprint" key, so `report_fingerprint(report) == report["fingerprint"]` verifies it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import threading
import time
from dataclasses import asdict, dataclass
from functools import wraps
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import orjson

from farense.config import ExperimentConfig, config_from_json
from farense.disk.preflight import require_writable
from farense.errors import DataError, FarenseError
from farense.model.compute import current_device
from farense.release.decision import REPORT_NAME, iso
from farense.release.textmetrics import aggregate, token_scores
from farense.run.fsutil import atomic_write_bytes, read_json_object, sha256_file
from farense.run.layout import RunPaths
from farense.run.metrics import read_metrics
from farense.run.plots import plot_f1_distribution, plot_loss_curves
from farense.train.batching import make_batch
from farense.train.data import make_datasets, read_split
from farense.train.losses import cross_entropy_for, target_mask
from farense.train.prefix_cache import counted_rows, head, head_splits_off
from farense.train.setup import load_base_model

REPORT_FORMAT = "farense.evaluation/1"
SUMMARY_CSV = "evaluation_summary.csv"
LOSS_PNG = "loss_curves.png"
F1_PNG = "f1_distribution.png"
CSV_COLUMNS = (
    "run_name", "config_name", "config_fingerprint", "examples", "exact_match", "precision", "recall", "f1",
    "f1_of_means", "test_loss", "test_perplexity", "best_step", "final_step", "train_val_gap", "gap_status",
    "created_at", "report_fingerprint",
)

Log = Callable[[str], None]


# One model evaluated at a time in a process: a campaign whose runs train side by side evaluates each as it
# finishes, from its own thread; two models at once would share MLX's device and double the memory.
_EVALUATING = threading.Lock()


def one_model_at_a_time(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _EVALUATING:
            return fn(*args, **kwargs)
    return wrapper


def utc_now() -> datetime:
    """The clock reports are stamped with; tests patch `farense.evaluation.utc_now`."""
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class EvaluationSummary:
    """What an evaluation found, and where it wrote it (the Prefect task returns this)."""

    run_name: str
    run_dir: Path
    report_path: Path
    summary_csv: Path
    plots: tuple[Path, ...]
    examples: int
    test_loss: float | None
    test_perplexity: float | None
    exact_match: float
    precision: float
    recall: float
    f1: float
    f1_of_means: float
    fingerprint: str
    config_fingerprint: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("run_dir", "report_path", "summary_csv"):
            d[k] = str(d[k])
        d["plots"] = [str(p) for p in self.plots]
        return d


# --------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class EvalExample:
    index: int  # position among the test split's examples
    messages: list[dict[str, Any]]  # the prompt: every message before the answer
    reference: str
    question: str  # the last user message, for people reading the report


def prompt_and_reference(example: dict[str, Any], config: ExperimentConfig, index: int) -> EvalExample:
    """Split one test example into the prompt messages and the reference answer."""
    d = config.data
    if d.chat_feature in example and not (d.prompt_feature in example and d.completion_feature in example):
        messages = list(example[d.chat_feature])
        if not messages or messages[-1].get("role") != "assistant":
            raise DataError(f"test example {index}: the last message must be the assistant's answer")
        prompt = messages[:-1]
        reference = messages[-1]["content"]
    elif d.prompt_feature in example and d.completion_feature in example:
        prompt = [{"role": "user", "content": example[d.prompt_feature]}]
        reference = example[d.completion_feature]
    else:
        raise DataError(
            f"test example {index}: evaluation needs reference answers ('{d.chat_feature}' chat data or "
            f"'{d.prompt_feature}'/'{d.completion_feature}'); plain '{d.text_feature}' data has none"
        )
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return EvalExample(index, prompt, reference, users[-1] if users else "")


def load_test_examples(config: ExperimentConfig, limit: int | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """The test split's examples (validated, file:line problems reported), the first `limit` of them."""
    path = config.data_dir / "test.jsonl"
    if not path.exists():
        raise DataError(f"{path}: file not found (evaluation needs the test split)")
    problems: list[str] = []
    examples, _ = read_split(path, config.data, problems)
    if problems:
        raise DataError(problems)
    if not examples:
        raise DataError(f"{path}: the test split is empty")
    return path, examples[:limit] if limit else examples


# --------------------------------------------------------------------------- model work


def load_model(config: ExperimentConfig, adapters_dir: Path) -> tuple[Any, Any]:
    """The base model as training loaded it (quantized on load for QLoRA) plus the run's adapters."""
    from mlx_lm.tuner.utils import load_adapters

    model, tokenizer = load_base_model(config)
    model = load_adapters(model, str(adapters_dir))
    model.eval()
    return model, tokenizer


def example_losses(model: Any, dataset: Any, batch_size: int, max_seq_length: int) -> list[tuple[float, int]]:
    """(summed cross-entropy, token count) per example, with mlx-lm's masking and the training loss's
    cross-entropy for this device; every example counts (the ragged last batch too), so the test loss
    does not depend on the batch size. On a model whose head can be split off (farense.train.prefix_cache),
    the head runs only on the positions whose loss counts (the answers under mask_prompt)."""
    import mlx.core as mx
    import numpy as np

    cross_entropy = cross_entropy_for(current_device())
    split = head_splits_off(model)
    order = sorted(range(len(dataset)), key=lambda i: (len(dataset[i][0]), i))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(dataset)
    for start in range(0, len(order), batch_size):
        members = order[start : start + batch_size]
        batch, lengths = make_batch(dataset, members, max_seq_length)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        mask = target_mask(targets, lengths)
        ntok = mask.sum(axis=1)
        if split:
            spans = [tuple(pair) for pair in lengths.tolist()]
            rows, real = counted_rows(spans, inputs.shape[1])
            hidden = model.model(inputs).reshape(-1, model.args.hidden_size)
            ce = cross_entropy(head(model, hidden[mx.array(rows[:real])]), targets.reshape(-1)[mx.array(rows[:real])])
            mx.eval(ce, ntok)
            per_row, counts = np.array(ce, dtype=np.float64), ntok.tolist()  # rows grouped by example, in order
            ends = np.cumsum(counts)
            sums = [float(per_row[end - n : end].sum()) for n, end in zip(counts, ends)]
        else:
            ce = (cross_entropy(model(inputs), targets) * mask).astype(mx.float32).sum(axis=1)
            mx.eval(ce, ntok)
            sums = [ce[j].item() for j in range(len(members))]
        for j, i in enumerate(members):
            out[i] = (sums[j], int(ntok[j].item()))
    return out


def encode_prompt(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of the chat prompt, ending with the assistant's turn opened (add_generation_prompt)."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


def generate_answers(
    model: Any, tokenizer: Any, prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int,
    log: Log | None = None,
) -> list[tuple[str, int]]:
    """Greedy answers (text, generated tokens) for each prompt, `batch_size` prompts at a time."""
    from mlx_lm.generate import batch_generate

    out: list[tuple[str, int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        resp = batch_generate(model, tokenizer, chunk, max_tokens=max_new_tokens, return_token_ids=True,
                              prefill_batch_size=len(chunk), completion_batch_size=len(chunk))
        out.extend((text.strip(), len(ids)) for text, ids in zip(resp.texts, resp.token_ids))
        if log:
            log(f"generated {len(out)}/{len(prompts)} answers")
    return out


@dataclass(frozen=True)
class ScoredModel:
    """One model's scores on the test examples: per-example rows and their aggregate."""

    rows: list[dict[str, Any]]
    aggregate: Any
    test_loss: float
    perplexity: float
    test_tokens: int
    loss_seconds: float
    generation_seconds: float


def score_model(model: Any, tokenizer: Any, config: ExperimentConfig, raw: list[dict[str, Any]],
                examples: list[EvalExample], log: Log | None = None) -> ScoredModel:
    """Test loss (mlx-lm's masking) and greedy answers scored against the references, per example."""
    ev, say = config.evaluation, log or (lambda _msg: None)
    t0 = time.perf_counter()
    dataset = make_datasets(config, tokenizer, {"test": raw}, splits=("test",))["test"]
    losses = example_losses(model, dataset, ev.batch_size, config.training.max_seq_length)
    total_ce = sum(ce for ce, _ in losses)
    total_tok = sum(n for _, n in losses)
    test_loss = total_ce / total_tok if total_tok else float("nan")
    loss_seconds = time.perf_counter() - t0
    say(f"test loss {test_loss:.4f} over {total_tok} tokens ({len(raw)} examples)")

    t0 = time.perf_counter()
    prompts = [encode_prompt(tokenizer, ex.messages) for ex in examples]
    answers = generate_answers(model, tokenizer, prompts, ev.max_new_tokens, ev.batch_size, log)
    gen_seconds = time.perf_counter() - t0
    rows = []
    for ex, prompt, (text, n_gen), (ce, ntok) in zip(examples, prompts, answers, losses):
        rows.append({
            "index": ex.index, "prompt": ex.question, "reference": ex.reference, "generated": text,
            **token_scores(text, ex.reference).to_dict(), "loss": _nan_to_none(ce / ntok) if ntok else None,
            "prompt_tokens": len(prompt), "generated_tokens": n_gen,
        })
    perplexity = math.exp(test_loss) if math.isfinite(test_loss) and test_loss < 700 else float("inf")
    return ScoredModel(rows, aggregate(rows), test_loss, perplexity, total_tok, loss_seconds, gen_seconds)


@one_model_at_a_time
def evaluate_base_model(config: ExperimentConfig, out_path: Path, *, max_examples: int | None = None,
                        log: Log | None = None) -> dict[str, Any]:
    """Score the base model without adapters on the test split (what fine-tuning must beat); the
    summary is written atomically to `out_path` and returned."""
    require_writable({"the report's directory": out_path.parent}, "evaluating the base model")  # before loading
    ev = config.evaluation
    limit = max_examples if max_examples is not None else (ev.max_examples or None)
    test_path, raw = load_test_examples(config, limit)
    examples = [prompt_and_reference(e, config, i) for i, e in enumerate(raw)]
    (log or (lambda _m: None))(f"loading {config.model_path} without adapters (the base model)")
    model, tokenizer = load_base_model(config, log)
    model.eval()
    s = score_model(model, tokenizer, config, raw, examples, log)
    report = {
        "format": REPORT_FORMAT, "created_at": iso(utc_now()), "model_path": config.model_path,
        "test_file": {"path": str(test_path), "sha256": sha256_file(test_path), "examples_evaluated": len(raw)},
        "summary": {"examples": s.aggregate.examples, "exact_match": s.aggregate.exact_match,
                    "precision": s.aggregate.precision, "recall": s.aggregate.recall, "f1": s.aggregate.f1,
                    "f1_of_means": s.aggregate.f1_of_means, "test_loss": _nan_to_none(s.test_loss),
                    "test_perplexity": _nan_to_none(s.perplexity), "test_tokens": s.test_tokens},
        "rows": s.rows,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    return report


# --------------------------------------------------------------------------- report


def report_fingerprint(report: dict[str, Any]) -> str:
    """SHA-256 of the report's canonical JSON without its "fingerprint" key."""
    body = {k: v for k, v in report.items() if k != "fingerprint"}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _nan_to_none(v: float) -> float | None:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def summary_csv_bytes(report: dict[str, Any]) -> bytes:
    """evaluation_summary.csv: one header line and one row per run, so files concatenate."""
    s, t = report["summary"], report.get("training", {})
    row = {
        "run_name": report["run_name"], "config_name": report["config_name"],
        "config_fingerprint": report["config_fingerprint"], "created_at": report["created_at"],
        "report_fingerprint": report["fingerprint"],
        **{k: s.get(k) for k in ("examples", "exact_match", "precision", "recall", "f1", "f1_of_means", "test_loss",
                                 "test_perplexity")},
        **{k: t.get(k) for k in ("best_step", "final_step", "train_val_gap", "gap_status")},
    }
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue().encode()


def _read_optional_json(path: Path) -> dict[str, Any]:
    try:
        return orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {}


def _report(config: ExperimentConfig, paths: RunPaths, adapters_sha: str, test_path: Path, raw: list, scored: Any,
            training: dict[str, Any], plots: tuple[Path, ...]) -> dict[str, Any]:
    """evaluation_report.json (before its fingerprint): what was evaluated, how, and the scores."""
    agg, ev = scored.aggregate, config.evaluation
    return {
        "format": REPORT_FORMAT,
        "created_at": iso(utc_now()),
        "run_name": paths.name,
        "run_dir": str(paths.root),
        "config_name": config.name,
        "config_fingerprint": config.fingerprint,
        "model_path": config.model_path,
        "adapters": {"path": str(paths.adapters), "sha256": adapters_sha},
        "test_file": {"path": str(test_path), "sha256": sha256_file(test_path), "examples_evaluated": len(raw)},
        "generation": {"sampler": "greedy", "max_new_tokens": ev.max_new_tokens, "batch_size": ev.batch_size},
        "summary": {
            "examples": agg.examples,
            "exact_match": agg.exact_match,
            "precision": agg.precision,
            "recall": agg.recall,
            "f1": agg.f1,
            "f1_of_means": agg.f1_of_means,
            "test_loss": _nan_to_none(scored.test_loss),
            "test_perplexity": _nan_to_none(scored.perplexity),
            "test_tokens": scored.test_tokens,
        },
        "training": training,
        "timings": {"loss_seconds": round(scored.loss_seconds, 3),
                    "generation_seconds": round(scored.generation_seconds, 3)},
        "files": {"summary_csv": SUMMARY_CSV, "plots": [p.name for p in plots]},
        "rows": scored.rows,
    }


def current_report(config: ExperimentConfig, run_dir: Path) -> dict[str, Any] | None:
    """The run's evaluation report, if it was made from this config and the adapters the run has now."""
    paths = RunPaths(Path(run_dir))
    report = read_json_object(paths.evaluation / REPORT_NAME)
    if not report or report.get("config_fingerprint") != config.fingerprint or not paths.best_adapters.is_file():
        return None
    if report.get("adapters", {}).get("sha256") != sha256_file(paths.best_adapters):
        return None
    return report


@one_model_at_a_time
def evaluate_run(
    run_dir: Path,
    *,
    config: ExperimentConfig | None = None,
    max_examples: int | None = None,
    log: Log | None = None,
) -> EvaluationSummary:
    """Evaluate the run's best adapters on the test split and write the report, CSV and plots.

    `config` defaults to the run's config.json; `max_examples` to config.evaluation.max_examples
    (0: all). Generation length and batch size come from config.evaluation.
    """
    t_start = time.perf_counter()
    paths = RunPaths(Path(run_dir).resolve())
    weights = paths.best_adapters
    if not weights.is_file() or not paths.best_adapter_config.is_file():
        raise FarenseError(f"run {paths.name} has no best adapters in {paths.adapters} (train it first)")
    if config is None:
        if not paths.config.is_file():
            raise FarenseError(f"run {paths.name} has no config.json ({paths.config}); pass the config explicitly")
        config = config_from_json(paths.config)
    require_writable({"the evaluation directory": paths.evaluation}, f"evaluating {paths.name}")  # before loading
    ev = config.evaluation
    limit = max_examples if max_examples is not None else (ev.max_examples or None)
    test_path, raw = load_test_examples(config, limit)
    examples = [prompt_and_reference(e, config, i) for i, e in enumerate(raw)]
    say = log or (lambda _msg: None)

    say(f"loading {config.model_path} with the adapters of {paths.name}")
    adapters_sha = sha256_file(weights)  # the report names the adapters evaluated, not whatever is there later
    model, tokenizer = load_model(config, paths.adapters)
    if sha256_file(weights) != adapters_sha:
        raise FarenseError(f"the adapters of {paths.name} changed while they were loaded ({weights}); is the run "
                           "training? Evaluate again when it ends")
    scored = score_model(model, tokenizer, config, raw, examples, log)
    rows, agg, test_loss, perplexity = scored.rows, scored.aggregate, scored.test_loss, scored.perplexity
    training = _read_optional_json(paths.summary)

    paths.evaluation.mkdir(parents=True, exist_ok=True)
    plots = (
        plot_loss_curves(read_metrics(paths.metrics_jsonl), {"run_name": paths.name, **training},
                         paths.evaluation / LOSS_PNG),
        plot_f1_distribution(rows, paths.evaluation / F1_PNG, title=f"{paths.name}: per-example F1",
                             threshold=config.decision.min_f1),
    )
    report = _report(config, paths, adapters_sha, test_path, raw, scored, training, plots)
    report["fingerprint"] = report_fingerprint(report)
    csv_path = paths.evaluation / SUMMARY_CSV
    atomic_write_bytes(csv_path, summary_csv_bytes(report))
    report_path = paths.evaluation / REPORT_NAME
    atomic_write_bytes(report_path, orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    say(f"F1 {agg.f1:.4f}  precision {agg.precision:.4f}  recall {agg.recall:.4f}  exact match {agg.exact_match:.4f}")
    return EvaluationSummary(
        run_name=paths.name, run_dir=paths.root, report_path=report_path, summary_csv=csv_path, plots=plots,
        examples=agg.examples, test_loss=_nan_to_none(test_loss), test_perplexity=_nan_to_none(perplexity),
        exact_match=agg.exact_match, precision=agg.precision, recall=agg.recall, f1=agg.f1,
        f1_of_means=agg.f1_of_means, fingerprint=report["fingerprint"], config_fingerprint=config.fingerprint,
        seconds=round(time.perf_counter() - t_start, 3),
    )
