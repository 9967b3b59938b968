"""Two loss curves side by side, for a lever that changes precision: per-step and smoothed differences, and a plot.

    B="python benchmarks/bench_train.py --data ../shared/data/gsm8k --methods lora --sides gsmtune --repeats 1 --max-steps 100"
    $B --out benchmarks/results/curve_default.json
    $B --out benchmarks/results/curve_reference.json training.answer_head=false
    python benchmarks/compare_losses.py benchmarks/results/curve_reference.json benchmarks/results/curve_default.json \\
        --plot benchmarks/results/curve.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def losses(path: Path) -> tuple[str, list[float]]:
    data = json.loads(path.read_text())
    row = data["table"][0]
    side = next(k for k in row if k != "method")
    return f"{row['method']} {side} {' '.join(data['args']['extra']) or 'defaults'}", row[side]["losses"]


def smooth(xs: list[float], k: int = 10) -> list[float]:
    return [statistics.mean(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reference", type=Path)
    p.add_argument("candidate", type=Path)
    p.add_argument("--plot", type=Path)
    a = p.parse_args()
    (ref_name, ref), (cand_name, cand) = losses(a.reference), losses(a.candidate)
    if len(ref) != len(cand):
        raise SystemExit(f"different lengths: {len(ref)} vs {len(cand)} steps")
    rel = [abs(c - r) / r for r, c in zip(ref, cand, strict=True)]
    smooth_rel = [abs(c - r) / r for r, c in zip(smooth(ref), smooth(cand), strict=True)]
    print(f"reference: {ref_name}\ncandidate: {cand_name}\n{len(ref)} steps")
    print(f"per-step relative difference: median {statistics.median(rel):.2%}, max {max(rel):.2%}")
    print(f"10-step moving average: max relative difference {max(smooth_rel):.2%}")
    print(f"mean loss: reference {statistics.mean(ref):.4f}, candidate {statistics.mean(cand):.4f}; last 10 steps: "
          f"{statistics.mean(ref[-10:]):.4f} vs {statistics.mean(cand[-10:]):.4f}")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        steps = range(1, len(ref) + 1)
        for name, curve, style in ((ref_name, ref, "-"), (cand_name, cand, "--")):
            ax.plot(steps, curve, style, alpha=0.35)
            ax.plot(steps, smooth(curve), style, label=f"{name} (10-step mean)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)


if __name__ == "__main__":
    main()
