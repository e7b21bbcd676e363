"""Evaluation plots as PNG bytes: ROC, precision-recall, confusion matrix, Dice histogram, calibration.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global state, no display needed).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

_SIZE = (4.8, 4.2)
_DPI = 110


def _figure() -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _no_data(fig: Any, ax: Any, why: str) -> bytes:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    return _png(fig)


def roc_png(y: np.ndarray, s: np.ndarray, threshold: float) -> bytes:
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = _figure()
    ax = fig.add_subplot()
    if y.all() or not y.any():
        return _no_data(fig, ax, "ROC undefined: the labels hold one class only")
    fpr, tpr, _ = roc_curve(y, s)
    ax.plot(fpr, tpr, lw=2, label=f"AUC {roc_auc_score(y, s):.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    p = s >= threshold
    ax.plot([np.mean(p[~y])], [np.mean(p[y])], "o", c="crimson", label=f"operating point (>= {threshold:.3g})")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return _png(fig)


def pr_png(y: np.ndarray, s: np.ndarray, threshold: float) -> bytes:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig = _figure()
    ax = fig.add_subplot()
    if not y.any():
        return _no_data(fig, ax, "PR curve undefined: no positive image")
    precision, recall, _ = precision_recall_curve(y, s)
    ax.plot(recall, precision, lw=2, label=f"AP {average_precision_score(y, s):.3f}")
    ax.axhline(float(np.mean(y)), ls="--", c="grey", lw=1, label="prevalence")
    p = s >= threshold
    if p.any():
        ax.plot([np.mean(p[y])], [np.mean(y[p])], "o", c="crimson", label=f"operating point (>= {threshold:.3g})")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left")
    return _png(fig)


def confusion_png(decision: dict[str, Any]) -> bytes:
    """The scan's own decision, an outline drawn or not, against the labels (``decision``: counts tp/fp/fn/tn)."""
    return _png(confusion_figure(decision))


def confusion_figure(decision: dict[str, Any]) -> Any:
    fig = _figure()
    ax = fig.add_subplot()
    cells = np.array([[decision["tn"], decision["fp"]], [decision["fn"], decision["tp"]]])
    ax.imshow(cells, cmap="Blues")
    for (i, j), v in np.ndenumerate(cells):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=14, c="black" if v < cells.max() / 2 else "white")
    # Two short lines a label: a one-line "label negative" did not fit beside the square plot.
    ax.set_xticks([0, 1], ["no outline", "outlined"])
    ax.set_yticks([0, 1], ["label\nnegative", "label\npositive"])
    ax.set_title("the scan's decision: an outline drawn", fontsize=9)
    return fig


def curves_png(history: list[dict[str, Any]], selection: str) -> bytes:
    """A training run's curves from its metrics.jsonl rows: training and validation loss, and the validation
    figures that choose the best epoch (AUC, or the competition Dice and Dice on positives), per epoch."""
    fig = _figure()
    loss, score = fig.subplots(1, 2)
    epochs = [int(r["epoch"]) for r in history]  # counted from 1

    def series(key: str) -> list[float]:
        return [float(r[key]) if r.get(key) is not None else np.nan for r in history]

    loss.plot(epochs, series("train_loss"), "o-", label="training")
    if any(r.get("val_loss") is not None for r in history):
        loss.plot(epochs, series("val_loss"), "o-", label="validation")
    loss.set(xlabel="epoch", title="loss")
    loss.legend()
    for key in dict.fromkeys((selection, "auc", "dice_positives")):
        if any(r.get(f"val_{key}") is not None for r in history):
            score.plot(epochs, series(f"val_{key}"), "o-", label=key.replace("_", " "))
    best = [e for e, r in zip(epochs, history, strict=True) if r.get("best")]
    for e in best[-1:]:
        score.axvline(e, ls="--", c="grey", lw=1, label="best.pt")
    score.set(xlabel="epoch", title="validation", ylim=(0, 1.01))
    score.legend(fontsize=7)
    return _png(fig)


def dice_histogram_png(dice: np.ndarray, y: np.ndarray) -> bytes:
    fig = _figure()
    ax = fig.add_subplot()
    bins = np.linspace(0, 1, 21)
    ax.hist([dice[y], dice[~y]], bins=bins, stacked=True, label=["label positive", "label negative"])
    ax.set(xlabel="Dice per image", ylabel="images", title=f"Dice (mean {dice.mean():.3f})" if len(dice) else "Dice")
    ax.legend(loc="upper center")
    return _png(fig)


def calibration_png(y: np.ndarray, s: np.ndarray, bins: int = 10) -> bytes:
    """The reliability diagram: share positive against mean probability in equal-width bins (the numbers of
    :func:`pneumotriage.metrics.calibration_bins`, with the expected calibration error in the title), and how
    many images each bin holds."""
    from pneumotriage.metrics import calibration_bins

    fig = _figure()
    ax = fig.add_subplot()
    if y.all() or not y.any():
        return _no_data(fig, ax, "calibration undefined: the labels hold one class only")
    cal = calibration_bins(y, s, bins)
    filled = [i for i, c in enumerate(cal["count"]) if c]
    predicted = [cal["mean_probability"][i] for i in filled]
    observed = [cal["share_positive"][i] for i in filled]
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    ax.plot(predicted, observed, "o-", lw=2, label="model")
    counts = ax.twinx()
    counts.bar([(i + 0.5) / bins for i in range(bins)], cal["count"], width=0.9 / bins, alpha=0.15, color="C0")
    counts.set_ylabel("images in the bin")
    ax.set(
        xlabel="mean predicted probability",
        ylabel="share positive",
        title=f"Reliability (ECE {cal['ece']:.3f}, {bins} bins)",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(loc="upper left")
    return _png(fig)
