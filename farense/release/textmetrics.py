"""Answer metrics: SQuAD-style exact match and token-level precision, recall and F1.

The normalisation suits Portuguese as well as English: case, accents ("São Luís" = "sao luis"),
punctuation and articles (o, a, os, as, um, uma, uns, umas; a, an, the) do not count against an
answer. Punctuation is deleted, as SQuAD does, so "1.000" and "1000" agree.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

# Portuguese definite and indefinite articles, and English ones. Contractions such as "do", "da",
# "no", "na" are prepositions as well and are kept: dropping them changes what an answer says.
ARTICLES = frozenset({"o", "a", "os", "as", "um", "uma", "uns", "umas", "an", "the"})

_WS_RE = re.compile(r"\s+")


def strip_accents(text: str) -> str:
    """Remove diacritics ("ç" -> "c", "ã" -> "a") by NFKD decomposition, dropping combining marks."""
    return "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))


def _is_punctuation(ch: str) -> bool:
    # Unicode punctuation (P*) and symbols (S*): covers «», “”, –, —, ¿, ¡, º, ª and ASCII punctuation.
    return unicodedata.category(ch)[0] in "PS"


def normalize_answer(text: str) -> str:
    """Lower-case, strip accents and punctuation, drop articles, collapse whitespace."""
    text = strip_accents(text.lower())
    text = "".join(ch for ch in text if not _is_punctuation(ch))
    tokens = [t for t in _WS_RE.split(text) if t and t not in ARTICLES]
    return " ".join(tokens)


def answer_tokens(text: str) -> list[str]:
    """The tokens F1 counts: the normalised answer split on whitespace."""
    normalized = normalize_answer(text)
    return normalized.split() if normalized else []


@dataclass(frozen=True)
class Scores:
    """Scores of one answer (or the means over many); every value lies in [0, 1]."""

    precision: float
    recall: float
    f1: float
    exact_match: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def token_scores(prediction: str, reference: str) -> Scores:
    """SQuAD-style scores of one prediction against one reference.

    Overlap counts tokens with multiplicity (Counter intersection). When either side normalises to
    nothing, every score is 1 if both do and 0 otherwise (as SQuAD's evaluation script does).
    """
    pred = answer_tokens(prediction)
    ref = answer_tokens(reference)
    em = float(pred == ref)
    if not pred or not ref:
        return Scores(em, em, em, em)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return Scores(0.0, 0.0, 0.0, em)
    precision = same / len(pred)
    recall = same / len(ref)
    return Scores(precision, recall, 2 * precision * recall / (precision + recall), em)


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b), 0 when both are 0."""
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


@dataclass(frozen=True)
class Aggregate:
    """Means over examples; `f1` is the mean per-example F1 (SQuAD), `f1_of_means` the harmonic mean
    of mean precision and mean recall (how the seed's hand evaluation reported F1 0.9602 from
    precision 0.9402 and recall 0.9810)."""

    examples: int
    precision: float
    recall: float
    f1: float
    exact_match: float
    f1_of_means: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def aggregate(rows: Iterable[Scores | Mapping[str, Any]]) -> Aggregate:
    """Average scores over examples (each weighs the same); rows may be Scores or report rows."""
    n = 0
    sums = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "exact_match": 0.0}
    for row in rows:
        values = row.to_dict() if isinstance(row, Scores) else row
        for key in sums:
            sums[key] += float(values[key])
        n += 1
    if n == 0:
        raise ValueError("aggregate: no scored examples to average")
    means = {k: v / n for k, v in sums.items()}
    return Aggregate(examples=n, **means, f1_of_means=harmonic_mean(means["precision"], means["recall"]))
