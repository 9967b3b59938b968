"""GRPO step time on one machine: sampling through gsmtune's decode loop vs TRL's own `generate()`.

Both runs are `gsmtune train` with the same config, seed and prompts, differing only in `training.grpo.rollout`;
each in its own process, one after the other. Completions are sampled, so the two runs do not see the same samples:
compare seconds per step and per sampled token, and the mean completion length TRL logs for each step.

    python benchmarks/bench_grpo.py --data ../shared/data/gsm8k --model results/cpu/lora_main/model --steps 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(rollout: str, a, out: Path) -> dict:
    cmd = [sys.executable, "-m", "gsmtune.cli", "train", a.config, "dataset.source=local", f"dataset.path={a.data}",
           f"model.name={a.model}", f"training.max_steps={a.steps}", f"training.save_steps={a.steps}",
           f"training.grpo.rollout={rollout}", f"output_dir={out}", *a.overrides]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    m = json.loads((out / "train_metrics.json").read_text())
    # the last step's checkpoint (save_steps = steps) keeps TRL's log history: completion lengths per step
    logs = json.loads(next(out.glob("checkpoints/checkpoint-*/trainer_state.json")).read_text())["log_history"]
    lengths = [h["completions/mean_length"] for h in logs if "completions/mean_length" in h]
    seconds = m["train_runtime_seconds"]
    return {"rollout": rollout, "wall_s": wall, "train_s": seconds, "s_per_step": seconds / m["global_step"],
            "steps": m["global_step"], "tokens_seen": m["tokens_seen"], "peak_gib": m["peak_memory_gib"],
            "mean_completion_length_by_step": lengths,
            "mean_reward_by_step": [p.get("reward") for p in m["reward_curve"]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--model", required=True, help="the policy to start from (an adapter or model folder)")
    p.add_argument("--config", default="cpu/grpo_from_lora")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", type=Path)
    p.add_argument("overrides", nargs="*", help="more key=value settings for both runs")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rollout in ("trl", "decode_loop"):
            rows.append(run(rollout, a, Path(tmp) / rollout))
            print(json.dumps(rows[-1]), flush=True)
    trl, loop = rows
    result = {"config": a.config, "model": a.model, "steps": a.steps, "overrides": a.overrides, "runs": rows,
              "speedup_s_per_step": trl["s_per_step"] / loop["s_per_step"],
              "mean_length_trl": statistics.mean(trl["mean_completion_length_by_step"] or [float("nan")]),
              "mean_length_loop": statistics.mean(loop["mean_completion_length_by_step"] or [float("nan")])}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
