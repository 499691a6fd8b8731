"""The comparison table, straight from MLflow: encoder × task × fraction → test MAE over seeds.

    collect_runs(tracker, tasks)   finished runs of the `finetune/<task>` experiments, one row each
                                   (tags: task, encoder, mode, fraction, seed; metrics test_*)
    comparison_table(runs)         grouped by task, encoder (release id + mode, or "scratch"),
                                   fraction: test MAE mean ± std (over seeds), RMSE and R² means,
                                   the relative gain over the from-scratch encoder of the same
                                   task, fraction and architecture: 100 × (MAE_scratch − MAE) / MAE_scratch,
                                   and over the composition baseline (baseline:magpie-hgb) of the
                                   same task and fraction: 100 × (MAE_baseline − MAE) / MAE_baseline
    write_comparison(table, dir)   comparison.csv, comparison.md, mae_vs_fraction.png
"""
from __future__ import annotations

import math
from pathlib import Path

from crystalfm_common.metrics import split_metrics
from finetune.tracking import EXPERIMENT_PREFIX, Tracker, experiment_name

COLUMNS = ["task", "unit", "encoder", "encoder_name", "fraction", "n_seeds", "mae_mean", "mae_std", "rmse_mean",
           "r2_mean", "gain_vs_scratch_pct", "gain_vs_baseline_pct"]
BASELINE_LABEL = "baseline:magpie-hgb"  # the reference of gain_vs_baseline_pct (finetune.baseline.MAGPIE_HGB)
# Row order within a task and fraction: the anchors first, then scratch, then the encoders.
_FIRST = {"baseline:train-mean": 0, BASELINE_LABEL: 1, "scratch": 2}


def encoder_label(encoder: str, mode: str, probe: str | None = None, head_init: str | None = None) -> str:
    if mode == "baseline":
        return encoder  # e.g. baseline:magpie-hgb
    if mode == "scratch" or encoder == "scratch":
        return "scratch"
    head = ", head from pretraining" if head_init == "property_head" else ""
    if mode == "frozen":
        return f"{encoder} (frozen-{probe or 'mlp'}{head})"
    return f"{encoder} ({mode}{head})"


def collect_runs(tracker: Tracker, tasks: list[str] | None = None):
    import pandas as pd

    if tasks:
        experiments = [e for e in (tracker.client.get_experiment_by_name(experiment_name(t)) for t in tasks) if e]
    else:
        experiments = [e for e in tracker.client.search_experiments() if e.name.startswith(EXPERIMENT_PREFIX)]
    rows = []
    for experiment in experiments:
        page_token = None
        while True:
            page = tracker.client.search_runs(
                [experiment.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=1000,
                page_token=page_token,
            )
            for run in page:
                tags, metrics = run.data.tags, run.data.metrics
                metrics = {**{f"test_{k}": v for k, v in split_metrics(metrics, "test").items()}, **metrics}
                if "test_mae" not in metrics or "task" not in tags:  # test/mae, or test_mae in stores before #17
                    continue
                rows.append({
                    "run_id": run.info.run_id,
                    "task": tags["task"],
                    "unit": tags.get("unit", ""),
                    "encoder": encoder_label(tags.get("encoder", "?"), tags.get("mode", "?"), tags.get("probe"), tags.get("head_init")),
                    "encoder_name": tags.get("encoder_name", ""),
                    "mode": tags.get("mode", ""),
                    "fraction": float(tags.get("fraction", "nan")),
                    "seed": int(tags.get("seed", -1)),
                    "test_mae": metrics["test_mae"],
                    "test_rmse": metrics.get("test_rmse", math.nan),
                    "test_r2": metrics.get("test_r2", math.nan),
                })
            page_token = page.token
            if not page_token:
                break
    return pd.DataFrame(rows, columns=["run_id", "task", "unit", "encoder", "encoder_name", "mode", "fraction", "seed",
                                       "test_mae", "test_rmse", "test_r2"])


def comparison_table(runs):
    import pandas as pd

    if runs.empty:
        return pd.DataFrame(columns=COLUMNS)
    # Repeated runs of one (task, encoder, fraction, seed) count once: the latest is kept.
    runs = runs.drop_duplicates(subset=["task", "encoder", "encoder_name", "fraction", "seed"], keep="first")
    grouped = runs.groupby(["task", "unit", "encoder", "encoder_name", "fraction"], as_index=False).agg(
        n_seeds=("seed", "nunique"), mae_mean=("test_mae", "mean"), mae_std=("test_mae", "std"),
        rmse_mean=("test_rmse", "mean"), r2_mean=("test_r2", "mean"),
    )
    scratch = grouped[grouped["encoder"] == "scratch"]
    gains = []
    for row in grouped.itertuples():
        base = scratch[(scratch["task"] == row.task) & (scratch["fraction"] == row.fraction)]
        same_arch = base[base["encoder_name"] == row.encoder_name]
        base = same_arch if not same_arch.empty else base
        if row.encoder == "scratch" or base.empty:
            gains.append(math.nan)
        else:
            gains.append(_gain(float(base["mae_mean"].iloc[0]), row.mae_mean))
    grouped["gain_vs_scratch_pct"] = gains
    baseline = grouped[grouped["encoder"] == BASELINE_LABEL]
    vs_baseline = []
    for row in grouped.itertuples():
        base = baseline[(baseline["task"] == row.task) & (baseline["fraction"] == row.fraction)]
        if row.encoder == BASELINE_LABEL or base.empty:
            vs_baseline.append(math.nan)
        else:
            vs_baseline.append(_gain(float(base["mae_mean"].iloc[0]), row.mae_mean))
    grouped["gain_vs_baseline_pct"] = vs_baseline
    order = grouped["encoder"].map(lambda e: (_FIRST.get(e, 3), e))
    grouped = grouped.assign(_order=order).sort_values(["task", "fraction", "_order"]).drop(columns="_order")
    return grouped[COLUMNS].reset_index(drop=True)


def _gain(reference: float, mae: float) -> float:
    return 100.0 * (reference - mae) / reference if reference > 0 else math.nan


def to_markdown(table) -> str:
    header = ["task", "encoder", "fraction", "seeds", "test MAE (mean ± std)", "RMSE", "R²", "gain vs scratch",
              "vs baseline"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.itertuples():
        std = "" if (row.mae_std is None or math.isnan(row.mae_std)) else f" ± {row.mae_std:.4f}"
        gain = "" if math.isnan(row.gain_vs_scratch_pct) else f"{row.gain_vs_scratch_pct:+.1f}%"
        vs_baseline = "" if math.isnan(row.gain_vs_baseline_pct) else f"{row.gain_vs_baseline_pct:+.1f}%"
        unit = f" {row.unit}" if row.unit else ""
        lines.append(
            f"| {row.task} | {row.encoder} | {row.fraction:g} | {row.n_seeds} | {row.mae_mean:.4f}{std}{unit} | "
            f"{row.rmse_mean:.4f} | {row.r2_mean:.3f} | {gain} | {vs_baseline} |"
        )
    return "\n".join(lines) + "\n"


def write_comparison(table, out_dir: str | Path) -> dict[str, Path]:
    from finetune.plots import fraction_plot

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "comparison.csv", "markdown": out_dir / "comparison.md", "png": out_dir / "mae_vs_fraction.png"}
    table.to_csv(paths["csv"], index=False)
    paths["markdown"].write_text(to_markdown(table))
    if not table.empty:
        units = dict(zip(table["task"], table["unit"]))
        fraction_plot(table, paths["png"], unit_of=units)
    else:
        paths.pop("png")
    return paths


def compare(out: str | Path = "finetune_runs", tracking_uri: str | None = None, tasks: list[str] | None = None,
            save_dir: str | Path | None = None):
    """Collect, tabulate and write. Returns (table, written paths)."""
    tracker = Tracker(out, tracking_uri)
    table = comparison_table(collect_runs(tracker, tasks))
    paths = write_comparison(table, save_dir or Path(out) / "comparison")
    return table, paths
