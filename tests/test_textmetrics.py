"""Answer metrics on hand-computed cases, Portuguese accents and articles included."""

from __future__ import annotations

import pytest

from farense.release.textmetrics import (
    Scores,
    aggregate,
    harmonic_mean,
    normalize_answer,
    strip_accents,
    token_scores,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Estádio de São Luís", "estadio de sao luis"),
        ("  O   Rio  de Janeiro. ", "rio de janeiro"),
        ("As capitais: Belém, Macapá e Maceió!", "capitais belem macapa e maceio"),
        ("Uma ação", "acao"),
        ("The answer is an apple", "answer is apple"),
        ("«Coração» — “pão”", "coracao pao"),
        ("R$ 1.000,00", "r 100000"),
        ("do da no na", "do da no na"),  # contractions are prepositions: kept
        ("", ""),
        ("o a os as", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_strip_accents_keeps_base_letters():
    assert strip_accents("àáâãçéêíóôõúüÀÇÃ") == "aaaaceeiooouuACA"


def test_accents_case_and_articles_do_not_break_exact_match():
    s = token_scores("Estádio de São Luís", "estadio de sao luis")
    assert s == Scores(1.0, 1.0, 1.0, 1.0)
    assert token_scores("O Maranhão.", "maranhao").exact_match == 1.0


def test_partial_overlap_hand_computed():
    # pred tokens: [capital, e, sao, luis] (4); ref tokens: [sao, luis, maranhao] (3); common 2
    s = token_scores("A capital é São Luís", "São Luís, Maranhão")
    assert s.precision == pytest.approx(2 / 4)
    assert s.recall == pytest.approx(2 / 3)
    assert s.f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))  # 4/7
    assert s.f1 == pytest.approx(4 / 7)
    assert s.exact_match == 0.0


def test_overlap_counts_multiplicity():
    # pred [sim, sim, sim] vs ref [sim, nao]: common = min(3, 1) = 1
    s = token_scores("sim sim sim", "sim não")
    assert s.precision == pytest.approx(1 / 3)
    assert s.recall == pytest.approx(1 / 2)
    assert s.f1 == pytest.approx(0.4)


def test_no_overlap_and_empty_answers():
    assert token_scores("azul", "vermelho") == Scores(0.0, 0.0, 0.0, 0.0)
    assert token_scores("", "vermelho") == Scores(0.0, 0.0, 0.0, 0.0)
    assert token_scores("o", "a") == Scores(1.0, 1.0, 1.0, 1.0)  # both normalise to nothing


def test_aggregate_means_and_seed_style_f1():
    rows = [Scores(1.0, 1.0, 1.0, 1.0), Scores(0.5, 1.0, 2 / 3, 0.0), {"precision": 0.0, "recall": 0.0, "f1": 0.0, "exact_match": 0.0}]
    agg = aggregate(rows)
    assert agg.examples == 3
    assert agg.precision == pytest.approx(0.5)
    assert agg.recall == pytest.approx(2 / 3)
    assert agg.f1 == pytest.approx((1 + 2 / 3) / 3)
    assert agg.exact_match == pytest.approx(1 / 3)
    assert agg.f1_of_means == pytest.approx(harmonic_mean(0.5, 2 / 3))


def test_seed_figures_are_f1_of_mean_precision_and_recall():
    # The seed reported V1 precision 0.9402, recall 0.9810 and F1 0.9602.
    assert round(harmonic_mean(0.9402, 0.9810), 4) == 0.9602


def test_aggregate_refuses_nothing():
    with pytest.raises(ValueError, match="no scored examples"):
        aggregate([])
