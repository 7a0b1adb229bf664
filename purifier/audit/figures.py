"""The two pictures of an audit, as inline SVG: one ROC with the defense's before and after and the
label-only floor, and privacy against real-traffic utility with the baselines and the served setting.

ROC at low false-positive rates on log axes follows Carlini et al. 2022 ("Membership Inference
Attacks From First Principles"); the floor is the strongest label-only attack, which no defense
that keeps the predicted label can push an attack below (Yeom et al. 2018; Choquette-Choo et al.
2021). The SVG embeds its glyphs as paths, so it renders the same without any font or network.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

UNDEFENDED, DEFENDED, FLOOR = "#c0392b", "#1f6fb2", "#222222"
# one colour and marker per defense, distinct in colour and in shape (printed in grey, too)
FAMILY_STYLES = (("#1f77b4", "o"), ("#ff7f0e", "s"), ("#2ca02c", "^"), ("#9467bd", "D"), ("#7f7f7f", "v"),
                 ("#8c564b", "P"), ("#e377c2", "X"), ("#bcbd22", "*"))


ROLES = {"before": (UNDEFENDED, "-", 1.6, 2), "after": (DEFENDED, "-", 2.2, 3), "floor": (FLOOR, "--", 1.8, 5)}


@dataclass(frozen=True)
class RocCurve:
    """One attack's ROC, (K,) fpr and tpr, drawn in the style of its `role` ("before", "after",
    "floor": the floor last and dashed, so it stays visible under a curve it equals); `points` are
    the headline operating points taken from it, (fpr, tpr, label) each."""

    label: str
    fpr: np.ndarray
    tpr: np.ndarray
    role: str
    points: tuple[tuple[float, float, str], ...] = ()


@dataclass(frozen=True)
class TradeoffPoint:
    """One audited setting: the defense, its setting, mean L1 on non-members, best attack AUC."""

    defense: str
    setting: str
    real_traffic_l1: float
    best_auc: float
    served: bool = False


def to_svg(fig) -> str:
    """A matplotlib figure as an `<svg>` element (no XML prolog), glyphs as paths, stable ids."""
    import matplotlib
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "purifier-report"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_figure(whole: Sequence[RocCurve], corner: Sequence[RocCurve], negatives: int):
    """Two panels: the whole ROC on linear axes (`whole`: the attacks behind the AUC figures,
    area = AUC), and the low false-positive corner on log axes from 1/negatives (`corner`: the
    attacks behind the TPR figures, their headline operating points marked), where a few
    confidently exposed members show up. The floor is drawn as a curve, on top."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    lo = 1.0 / max(negatives, 1)
    for ax, log, curves in zip(axes, (False, True), (whole, corner), strict=True):
        grid = np.logspace(np.log10(lo), 0, 60) if log else np.linspace(0, 1, 2)
        ax.plot(grid, grid, color="#999999", ls=":", lw=1, label="coin flip")
        for c in curves:
            color, ls, lw, z = ROLES[c.role]
            fpr, tpr = (np.maximum(c.fpr, lo), np.maximum(c.tpr, lo)) if log else (c.fpr, c.tpr)
            ax.plot(fpr, tpr, color=color, ls=ls, lw=lw, zorder=z, label=c.label)
            for x, y, words in c.points if log else ():
                ax.plot([max(x, lo)], [max(y, lo)], marker="o", ms=7, mfc="white", mec=color, mew=2, ls="none",
                        zorder=z + 1, label=words)
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(lo, 1)
            ax.set_ylim(lo, 1.05)
            ax.set_title("Low false-positive corner (log axes): the attacks behind the TPR figures", fontsize=9)
        else:
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.01)
            ax.set_title("Whole curve: the attacks behind the AUC figures", fontsize=9)
        ax.set_xlabel("non-members wrongly flagged (false-positive rate)")
        ax.set_ylabel("members found (true-positive rate)")
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def tradeoff_figure(points: Sequence[TradeoffPoint], floor_auc: float | None, undefended_auc: float | None,
                    floor_ci: tuple[float, float] | None = None, marked: str = "served"):
    """Best attack AUC against mean L1 distortion on non-members, one line per defense over its
    settings, the floor (with its 95% interval as a band, if given) and the undefended level as
    horizontal lines, the points flagged `served` ringed and labelled `marked` (e.g. "chosen")."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 4.6))
    families = list(dict.fromkeys(p.defense for p in points))
    for i, name in enumerate(families):
        pts = sorted((p for p in points if p.defense == name), key=lambda p: p.real_traffic_l1)
        color, marker = FAMILY_STYLES[i % len(FAMILY_STYLES)]
        ax.plot([p.real_traffic_l1 for p in pts], [p.best_auc for p in pts], marker=marker, ms=6, lw=1.4,
                color=color, label=name)
        for p in pts:
            ax.annotate(p.setting, (p.real_traffic_l1, p.best_auc), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=color)
    if floor_auc is not None:  # None: no label-only attack was run
        ax.axhline(floor_auc, color=FLOOR, ls="--", lw=1.4, label=f"label-only floor (AUC {floor_auc:.3f})")
    if floor_ci is not None:
        ax.axhspan(*floor_ci, color=FLOOR, alpha=0.1, lw=0,
                   label=f"floor 95% interval [{floor_ci[0]:.3f}, {floor_ci[1]:.3f}]")
    if undefended_auc is not None:
        ax.axhline(undefended_auc, color=UNDEFENDED, ls=":", lw=1.4, label=f"no defense (AUC {undefended_auc:.3f})")
    for p in points:
        if p.served:
            ax.plot([p.real_traffic_l1], [p.best_auc], marker="o", ms=16, mfc="none", mec="#000000", mew=2,
                    ls="none", label=f"{marked}: {p.defense} {p.setting}")
    ax.set_xlabel("mean change of a real user's confidence vector (L1, non-members)")
    ax.set_ylabel("best attack AUC (0.5 = coin flip)")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a point
    fig.tight_layout()
    return fig
