"""Where a `gsmtune train` step's time goes: torch.profiler over a few steady-state steps, grouped by what the time buys.

    python benchmarks/profile_train.py --data ../shared/data/gsm8k [key=value ...]
    GSMTUNE_ALLOCATOR=system python benchmarks/profile_train.py --data ... training.answer_head=false   # before

Runs `--steps` optimizer steps of the benchmark's setting (bench_train.py: first N train problems, LoRA, batch 2)
and profiles all but the first. Every op's own CPU time is charged to the first of its callers that names a group
(output layer + loss, optimizer), else to its own kind (matrix products, attention, dropout's random masks, the rest);
kernel time (page faults: the allocator) comes from the process's own counters over the same steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GROUPS = [  # (label, caller names that claim every op below them)
    ("output layer + loss (forward and backward)", ("ChunkedLogProb", "AnswerLogProbs")),
    ("optimizer step", ("Optimizer.step",)),
]
KINDS = [  # (label, op names), for ops no group claims
    ("other matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::addmm_", "aten::baddbmm")),
    ("attention kernels", ("scaled_dot_product",)),
    ("dropout random masks", ("aten::bernoulli_", "aten::random_")),  # torch's dropout; gsmtune's word masks
    ("dtype casts / copies", ("aten::copy_",)),
]


def group_of(event) -> str:
    parent = event
    while parent is not None:
        for label, names in GROUPS:
            if any(n in parent.name for n in names):
                return label
        parent = parent.cpu_parent
    for label, names in KINDS:
        if any(n in event.name for n in names):
            return label
    return "elementwise and the rest"


def main() -> None:
    from bench_train import first_problems, train_gsmtune

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--method", default="lora")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps; all but the first are profiled")
    p.add_argument("--out", type=Path, help="also write the table as json here")
    p.add_argument("extra", nargs="*", help="key=value overrides (a lever on or off)")
    a = p.parse_args()
    if a.steps < 2:
        p.error("--steps must be at least 2 (the first is not profiled)")

    import torch
    from transformers import TrainerCallback

    a.folder, a.max_steps = first_problems(a.data, a.n), a.steps
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    marks: dict[str, float] = {}

    def usage() -> tuple[float, float, float, int]:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt

    class Window(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                marks["start"], marks["tokens0"] = usage(), state.num_input_tokens_seen
                profiler.__enter__()

        def on_train_end(self, args, state, control, **kwargs):
            profiler.__exit__(None, None, None)
            marks["end"], marks["tokens1"] = usage(), state.num_input_tokens_seen

    train_gsmtune(a, Window())

    (w0, u0, s0, f0), (w1, u1, s1, f1) = marks["start"], marks["end"]
    seconds = defaultdict(float)
    for event in profiler.events():
        seconds[group_of(event)] += event.self_cpu_time_total / 1e6
    steps = a.steps - 1
    tokens = marks["tokens1"] - marks["tokens0"]
    # op time is per calling thread (it includes faults taken inside ops); kernel time is system CPU time over all
    # threads: read them as two views, the share column as a rough split
    rows = sorted(seconds.items(), key=lambda kv: -kv[1]) + [("kernel (system) time: page faults, mostly", s1 - s0)]
    total = sum(v for _, v in rows)
    print(f"\n{a.method}, overrides {a.extra or 'none'}; {steps} profiled steps, {tokens} tokens, wall {w1 - w0:.1f} s "
          f"({tokens / (w1 - w0):.0f} tokens/s), user {u1 - u0:.1f} s, system {s1 - s0:.1f} s, {f1 - f0:,} minor faults\n")
    print("| where | CPU s per step | share |\n|---|---|---|")
    for label, value in rows:
        print(f"| {label} | {value / steps:.2f} | {value / total:.0%} |")
    if a.out:
        a.out.write_text(json.dumps({"extra": a.extra, "steps": steps, "tokens": tokens, "wall": w1 - w0,
                                     "user": u1 - u0, "system": s1 - s0, "minor_faults": f1 - f0,
                                     "cpu_seconds": dict(rows)}, indent=1))


if __name__ == "__main__":
    main()
