"""The three figures fine-tuning writes: parity (per run), learning curve (per run), and test MAE
against label fraction per encoder (per comparison). Headless (Agg) so they work on cluster nodes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from crystalfm_common.metrics import metric_name

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def parity_plot(y_true, y_pred, path: str | Path, *, title: str, unit: str, metrics: dict | None = None) -> Path:
    plt = _pyplot()
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    mask = np.isfinite(y_true) & np.isfinite(y_pred)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.scatter(y_true[mask], y_pred[mask], s=6, alpha=0.6, edgecolors="none")
    if mask.any():
        lo = float(min(y_true[mask].min(), y_pred[mask].min()))
        hi = float(max(y_true[mask].max(), y_pred[mask].max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    label = f" ({unit})" if unit else ""
    ax.set_xlabel(f"true{label}")
    ax.set_ylabel(f"predicted{label}")
    ax.set_title(title, fontsize=9)
    if metrics:
        ax.text(0.04, 0.96, f"MAE {metrics.get('mae', float('nan')):.4g}\nR² {metrics.get('r2', float('nan')):.3f}",
                transform=ax.transAxes, va="top", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def learning_curve_plot(history: list[dict], path: str | Path, *, title: str, unit: str) -> Path:
    plt = _pyplot()
    epochs = np.arange(1, len(history) + 1)
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    train_loss, val_mae = metric_name("train", "loss"), metric_name("val", "mae")
    ax.plot(epochs, [h[train_loss] for h in history], label="train loss (MSE, normalised)", color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    if any(val_mae in h for h in history):
        twin = ax.twinx()
        twin.plot(epochs, [h.get(val_mae, np.nan) for h in history], label="val MAE", color="tab:orange")
        twin.set_ylabel(f"val MAE ({unit})" if unit else "val MAE")
        fig.legend(loc="upper right", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


_BASELINE_STYLE = {
    "baseline:magpie-hgb": {"marker": "s", "color": "black", "linestyle": "--"},
    "baseline:train-mean": {"marker": "x", "color": "grey", "linestyle": ":"},
}


def fraction_plot(table, path: str | Path, *, unit_of: dict[str, str] | None = None) -> Path:
    """Test MAE (mean ± std over seeds) against label fraction, one line per encoder, one panel per task.
    `table`: rows with task, encoder, fraction, mae_mean, mae_std (a pandas DataFrame)."""
    plt = _pyplot()
    tasks = sorted(table["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), dpi=120, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = table[table["task"] == task]
        for encoder in sorted(rows["encoder"].unique()):
            sub = rows[rows["encoder"] == encoder].sort_values("fraction")
            # The baselines are reference lines (black dashed, grey dotted), not competitors.
            style = _BASELINE_STYLE.get(encoder, {"marker": "o"})
            ax.errorbar(100 * sub["fraction"], sub["mae_mean"], yerr=sub["mae_std"].fillna(0), capsize=3, label=encoder,
                        **style)
        ax.set_xscale("log")
        ax.set_xlabel("label fraction (%)")
        unit = (unit_of or {}).get(task, "")
        ax.set_ylabel(f"test MAE ({unit})" if unit else "test MAE")
        ax.set_title(task, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
