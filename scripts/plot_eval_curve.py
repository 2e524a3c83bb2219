"""Plot a run's evaluation history (metrics.jsonl): FD against training step, class coverage.

    python scripts/plot_eval_curve.py runs/20260101-120000 --out docs/demo_digits_fd.png

Needs matplotlib (`pip install -e ".[plot]"`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default=None)
    args = p.parse_args()
    rows = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{args.run_dir / 'metrics.jsonl'} holds no evaluations")
    fd_key = next(k for k in ("digits_fd", "fid") if k in rows[0])
    label = {"digits_fd": "digits FD", "fid": "FID"}[fd_key]
    steps = [r["step"] for r in rows]

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.semilogy(steps, [r[fd_key] for r in rows], "o-", color="tab:blue", label=label)
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{label} (log scale, lower is better)", color="tab:blue")
    ax.grid(True, which="both", alpha=0.3)
    if "class_coverage" in rows[0]:
        ax2 = ax.twinx()
        ax2.plot(steps, [r["class_coverage"] for r in rows], "s--", color="tab:orange", label="classes covered")
        ax2.set_ylim(-0.5, 10.5)
        ax2.set_ylabel("digit classes covered (of 10)", color="tab:orange")
    n = rows[0].get("num_samples")
    ax.set_title(args.title or f"{args.run_dir.name}: {label} of {n} samples vs {rows[0].get('reference_images')} real")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
