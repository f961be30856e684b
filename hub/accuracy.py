"""Prediction quality from late labels: the figures and their intervals, sans-IO (numpy only).

Given the predictions of one group (a version, or one arm of it) and the true outcomes:

- classifiers (outcomes carry a class index): accuracy, precision and recall (binary: of class
  1; more classes: the macro average), AUC (binary only);
- regressions (outcomes carry a value): MAE and RMSE.

Intervals are 95%: Wilson score intervals for proportions (accuracy; binary precision and
recall); Hanley-McNeil's normal approximation for AUC; normal approximations of the mean for MAE
and for the mean squared error, whose bounds are square-rooted, for RMSE; a percentile bootstrap
(fixed seed, so a figure does not move between two looks at the same data) for macro precision
and recall, which are not proportions.

How a prediction is read from an output tensor (its values for one request, flattened):
one value is the probability of class 1 (class 1 when >= 0.5); two or more are class scores
(the class is the argmax; for two, the score of class 1 for AUC is the difference of the two,
which orders requests as the softmax probability does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054
BOOTSTRAP_ROUNDS = 200
BOOTSTRAP_SEED = 20261207
CLASSIFIER = "classifier"
REGRESSION = "regression"


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass(frozen=True)
class Quality:
    """One group's figures; None where a figure does not apply or has no data."""

    task: str
    labelled: int
    accuracy: Interval | None = None
    precision: Interval | None = None
    recall: Interval | None = None
    auc: Interval | None = None
    mae: Interval | None = None
    rmse: Interval | None = None


def wilson(successes: int, n: int, z: float = Z95) -> Interval | None:
    """The Wilson score interval of a proportion (sound near 0 and 1, unlike p +- z*se)."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n successes the bound on that side is exactly 0 or 1 (not a rounding away).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(p, low, high)


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def auc(
    scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray
) -> Interval | None:
    """ROC AUC of ``scores`` for class 1 (Mann-Whitney), with Hanley-McNeil's interval; None
    without both classes."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels) == 1
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return None
    a = float((_ranks(s)[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0)
    half = Z95 * math.sqrt(max(var, 0.0))
    return Interval(a, max(0.0, a - half), min(1.0, a + half))


def _mean_interval(x: np.ndarray) -> tuple[float, float]:
    mean = float(x.mean())
    half = Z95 * float(x.std(ddof=1)) / math.sqrt(len(x)) if len(x) > 1 else math.inf
    return mean, half


def regression(predicted: np.ndarray, truth: np.ndarray) -> Quality:
    e = np.asarray(predicted, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    n = len(e)
    if n == 0:
        return Quality(REGRESSION, 0)
    mae, half = _mean_interval(np.abs(e))
    mse, half2 = _mean_interval(e * e)
    return Quality(
        REGRESSION,
        n,
        mae=Interval(mae, max(0.0, mae - half), mae + half),
        rmse=Interval(math.sqrt(mse), math.sqrt(max(0.0, mse - half2)), math.sqrt(mse + half2)),
    )


def read_classes(outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(predicted class, score of class 1 or None) from outputs of shape [n, width]."""
    if outputs.shape[1] == 1:
        p = outputs[:, 0]
        return (p >= 0.5).astype(np.int64), p
    predicted = np.argmax(outputs, axis=1).astype(np.int64)
    if outputs.shape[1] == 2:
        return predicted, outputs[:, 1] - outputs[:, 0]
    return predicted, None


def _macro(y: np.ndarray, p: np.ndarray, k: int) -> tuple[float, float]:
    """Macro precision and recall over the classes present in ``y`` or ``p``."""
    conf = np.bincount(y * k + p, minlength=k * k).reshape(k, k)
    tp = np.diag(conf).astype(np.float64)
    predicted, actual = conf.sum(axis=0), conf.sum(axis=1)
    seen = (predicted + actual) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        rec = np.where(actual > 0, tp / np.maximum(actual, 1), 0.0)
    return float(prec[seen].mean()), float(rec[seen].mean())


def _bootstrap_macro(y: np.ndarray, p: np.ndarray, k: int) -> tuple[Interval, Interval]:
    prec, rec = _macro(y, p, k)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    n = len(y)
    ps, rs = np.empty(BOOTSTRAP_ROUNDS), np.empty(BOOTSTRAP_ROUNDS)
    for i in range(BOOTSTRAP_ROUNDS):
        idx = rng.integers(0, n, n)
        ps[i], rs[i] = _macro(y[idx], p[idx], k)
    lo, hi = 2.5, 97.5
    return (
        Interval(prec, float(np.percentile(ps, lo)), float(np.percentile(ps, hi))),
        Interval(rec, float(np.percentile(rs, lo)), float(np.percentile(rs, hi))),
    )


def classification(outputs: np.ndarray, labels: np.ndarray) -> Quality:
    """Figures for class scores ``outputs`` [n, width] against true class indices ``labels``."""
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    if n == 0:
        return Quality(CLASSIFIER, 0)
    predicted, score = read_classes(np.asarray(outputs, dtype=np.float64))
    correct = int((predicted == y).sum())
    width = outputs.shape[1]
    if width <= 2 and int(y.max()) <= 1:
        tp = int(((predicted == 1) & (y == 1)).sum())
        fp = int(((predicted == 1) & (y != 1)).sum())
        fn = int(((predicted != 1) & (y == 1)).sum())
        return Quality(
            CLASSIFIER,
            n,
            accuracy=wilson(correct, n),
            precision=wilson(tp, tp + fp),
            recall=wilson(tp, tp + fn),
            auc=auc(score, y) if score is not None else None,
        )
    k = max(width, int(y.max()) + 1, 2)
    prec, rec = _bootstrap_macro(y, predicted, k)
    return Quality(CLASSIFIER, n, accuracy=wilson(correct, n), precision=prec, recall=rec)


__all__ = [
    "CLASSIFIER",
    "REGRESSION",
    "Interval",
    "Quality",
    "auc",
    "classification",
    "read_classes",
    "regression",
    "wilson",
]
