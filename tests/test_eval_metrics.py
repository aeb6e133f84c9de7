"""Metrics on hand-computed cases (unsafe is the positive class; unknown/error excluded)."""

from __future__ import annotations

import doctest
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rsafe.evaluation import metrics
from rsafe.evaluation.metrics import (
    average_precision,
    compute_metrics,
    confusion,
    per_category,
    percentile,
    precision_recall_curve,
    precision_recall_f1,
)
from rsafe.models import Label


def test_doctests():
    assert doctest.testmod(metrics).failed == 0


def test_hand_computed_case():
    # gold:   U  U  U  U  S  S  S  S  U        S
    # pred:   U  U  U  S  U  S  S  S  unknown  error
    golds = [True, True, True, True, False, False, False, False, True, False]
    labels = ["unsafe", "unsafe", "unsafe", "safe", "unsafe", "safe", "safe", "safe", "unknown", "error"]
    m = compute_metrics(golds, labels)
    assert (m.tp, m.fn, m.fp, m.tn) == (3, 1, 1, 3)
    assert (m.n, m.n_answered, m.n_unsafe, m.n_unknown, m.n_error) == (10, 8, 5, 1, 1)
    assert m.precision == pytest.approx(3 / 4)
    assert m.recall == pytest.approx(3 / 4)
    assert m.f1 == pytest.approx(0.75)
    assert m.accuracy == pytest.approx(6 / 8)
    assert m.unknown_rate == pytest.approx(0.1)
    assert m.error_rate == pytest.approx(0.1)
    assert m.auprc is None and m.auprc_n == 0  # no probabilities given


def test_unknown_and_error_do_not_change_f1():
    base = compute_metrics([True, False, True], ["unsafe", "safe", "safe"])
    more = compute_metrics([True, False, True, True, False], ["unsafe", "safe", "safe", "unknown", "error"])
    assert (base.precision, base.recall, base.f1, base.accuracy) == (more.precision, more.recall, more.f1,
                                                                      more.accuracy)
    assert more.unknown_rate == pytest.approx(0.2) and more.error_rate == pytest.approx(0.2)


def test_label_enums_accepted():
    m = compute_metrics([True, False], [Label.UNSAFE, Label.SAFE])
    assert m.f1 == 1.0 and m.accuracy == 1.0


def test_undefined_ratios_are_none():
    # no unsafe prediction: precision undefined; recall 0; F1 0
    assert precision_recall_f1(0, 0, 3) == (None, 0.0, 0.0)
    # no unsafe gold: recall undefined; precision 0; F1 0
    assert precision_recall_f1(0, 2, 0) == (0.0, None, 0.0)
    # nothing unsafe anywhere: F1 undefined
    assert precision_recall_f1(0, 0, 0) == (None, None, None)
    m = compute_metrics([False, False], ["unknown", "error"])
    assert m.accuracy is None and m.f1 is None and m.unknown_rate == 0.5
    empty = compute_metrics([], [])
    assert empty.n == 0 and empty.unknown_rate is None


def test_f1_is_harmonic_mean():
    p, r, f1 = precision_recall_f1(5, 3, 7)
    assert f1 == pytest.approx(2 * p * r / (p + r))


def test_unexpected_label_and_length_mismatch():
    with pytest.raises(ValueError, match="unexpected predicted label 'maybe'"):
        confusion([True], ["maybe"])
    with pytest.raises(ValueError, match="2 gold labels but 1 predictions"):
        confusion([True, False], ["safe"])


# --------------------------------------------------------------------------- AUPRC


def test_average_precision_hand_computed():
    # thresholds .9 (P 1, R .5), .8 (P .5, R .5), .7 (P 2/3, R 1), .6 (P .5, R 1)
    # AP = .5 * 1 + 0 * .5 + .5 * 2/3 + 0 * .5 = 5/6
    assert average_precision([True, False, True, False], [0.9, 0.8, 0.7, 0.6]) == pytest.approx(5 / 6)


def test_average_precision_perfect_and_worst():
    assert average_precision([True, True, False], [0.9, 0.8, 0.1]) == pytest.approx(1.0)
    # the negative ranked first: thresholds .9 (P 0, R 0), .8 (P 1/2, R .5), .7 (P 2/3, R 1)
    # AP = 0 + .5 * 1/2 + .5 * 2/3 = 7/12
    assert average_precision([False, True, True], [0.9, 0.8, 0.7]) == pytest.approx(7 / 12)


def test_average_precision_ties_form_one_threshold():
    assert average_precision([True, False], [0.5, 0.5]) == pytest.approx(0.5)
    precisions, recalls, thresholds = precision_recall_curve([True, False, True], [0.7, 0.7, 0.2])
    assert thresholds == [0.7, 0.2]
    assert precisions == pytest.approx([0.5, 2 / 3]) and recalls == pytest.approx([0.5, 1.0])


def test_average_precision_skips_missing_scores_and_needs_a_positive():
    assert average_precision([True, False, True], [0.9, None, float("nan")]) == pytest.approx(1.0)
    assert average_precision([False, False], [0.3, 0.2]) is None
    assert average_precision([], []) is None


def test_auprc_uses_answered_examples_only():
    golds = [True, False, True, False]
    labels = ["unsafe", "safe", "unknown", "unsafe"]
    probs = [0.9, 0.2, None, 0.6]
    m = compute_metrics(golds, labels, probs)
    assert m.auprc_n == 3
    assert m.auprc == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0, 1)), min_size=1, max_size=40))
def test_average_precision_bounds(pairs):
    golds = [g for g, _ in pairs]
    scores = [s for _, s in pairs]
    ap = average_precision(golds, scores)
    if not any(golds):
        assert ap is None
    else:
        prevalence = sum(golds) / len(golds)
        assert 0 < ap <= 1 + 1e-12
        # a constant score gives exactly the prevalence
        assert average_precision(golds, [0.5] * len(golds)) == pytest.approx(prevalence)


# --------------------------------------------------------------------------- helpers


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([7], 95) == 7
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([10, 20, 30, 40], 95) == pytest.approx(38.5)
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_per_category():
    cats = [["violence"], ["violence", "weapons"], [], ["weapons"], ["weapons"]]
    golds = [True, True, False, True, False]
    labels = ["unsafe", "safe", "safe", "unsafe", "unsafe"]
    out = per_category(cats, golds, labels, [0.9, 0.4, 0.1, 0.8, 0.7])
    assert list(out) == ["violence", "weapons"]
    assert (out["violence"].n, out["violence"].recall) == (2, 0.5)
    w = out["weapons"]
    assert (w.n, w.tp, w.fn, w.fp) == (3, 1, 1, 1)
    assert w.f1 == pytest.approx(0.5)
    assert not math.isnan(w.auprc)
