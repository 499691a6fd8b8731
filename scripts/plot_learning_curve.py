"""Learning curve of a pretraining run: train loss (per log) and val loss (per eval) against step,
plus optional quick-validity checks (scripts/ddpm_quick_validity.py JSON lines) on a second axis.

    python scripts/plot_learning_curve.py RUN/metrics.jsonl OUT.png [--validity checks.jsonl] [--title T]
"""
from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics")
    parser.add_argument("out")
    parser.add_argument("--validity", default=None)
    parser.add_argument("--title", default="DDPM learning curve")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(args.metrics) if line.strip()]
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(*zip(*train), lw=1, label="train loss (ε-MSE, per 100 steps)")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="val loss (20 batches)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("ε-MSE")
    ax.set_yscale("log")
    if args.validity:
        checks = [json.loads(line) for line in open(args.validity) if line.strip()]
        checks = [c for c in checks if c.get("step") is not None]
        if checks:
            twin = ax.twinx()
            steps = [c["step"] for c in checks]
            twin.plot(steps, [c["struct_valid"] for c in checks], "s--", c="tab:green", label="struct. validity (100 samples)")
            twin.plot(steps, [c["comp_valid"] for c in checks], "^--", c="tab:red", label="comp. validity (100 samples)")
            twin.set_ylim(0, 1)
            twin.set_ylabel("validity")
            twin.legend(loc="center right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
