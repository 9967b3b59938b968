"""Training speed on one machine: `gsmtune train` vs a plain TRL `SFTTrainer` with its default arguments.

Both get the same tokenized rows (the first N GSM8K train problems, `Question: q\\nAnswer:` + answer + EOS, loss on the
answer), the same effective batch, learning rate and schedule, the same seed (so the same batches in the same order),
and LoRA gets the same adapter shape. Everything else is each side's default. Each run is its own process.
Sides: `gsmtune`; `trl` as its users run it; `trl_alloc`, TRL under the same allocator setting as gsmtune.
Speed is steady state: non-padding tokens from the end of the first optimizer step to the end of the last, over
that time (the first step, with its warm-up, is excluded).

    python benchmarks/bench_train.py --data ../shared/data/gsm8k --methods lora,full
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LR = {"lora": 2e-4, "full": 5e-5}


def settings(a) -> list[str]:
    return ["dataset.source=local", f"dataset.path={a.folder}", "dataset.train_samples=null", "prompt.strategy=zero_shot",
            f"training.method={a.method}", f"training.learning_rate={LR[a.method]}", "training.lr_scheduler_type=linear",
            f"training.per_device_train_batch_size={a.batch_size}", f"training.gradient_accumulation_steps={a.accumulation}",
            f"training.max_steps={a.max_steps}", "training.logging_steps=1", f"training.save_steps={a.max_steps + 1}",
            "training.max_length=512"]


class StepClock:
    """A TrainerCallback noting, at the end of every optimizer step, the time and the tokens seen so far."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.times.append(time.perf_counter())
                clock.tokens.append(int(state.num_input_tokens_seen))

        self.times: list[float] = []
        self.tokens: list[int] = []
        self.callback = _Callback()

    def result(self, seconds: float, losses: list[float]) -> dict:
        steady = (self.tokens[-1] - self.tokens[0]) / (self.times[-1] - self.times[0])
        return {"seconds": seconds, "tokens": self.tokens[-1], "steady_tokens_per_s": steady,
                "steady_s_per_step": (self.times[-1] - self.times[0]) / (len(self.times) - 1),
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "losses": losses}


def first_problems(data: Path, n: int) -> Path:
    """A folder whose train.jsonl holds the first `n` GSM8K train problems of `data`."""
    folder = Path(tempfile.mkdtemp())
    with (data / "train.jsonl").open() as f:
        (folder / "train.jsonl").write_text("".join(next(f) for _ in range(n)))
    return folder


def train_gsmtune(a, callback) -> Path:
    """`run_train` on the benchmark's setting plus `a.extra`, with `callback` added to its trainer; the run folder."""
    import gsmtune.training.sft as sft
    from gsmtune.config import load_config
    from gsmtune.training.driver import run_train

    build = sft.build_trainer

    def build_with_callback(*args, **kwargs):
        trainer, path = build(*args, **kwargs)
        trainer.add_callback(callback)
        return trainer, path

    sft.build_trainer = build_with_callback
    out = Path(tempfile.mkdtemp())
    run_train(load_config(None, [*settings(a), f"output_dir={out}", *a.extra]))
    return out


def gsmtune_worker(a) -> dict:
    clock = StepClock()
    out = train_gsmtune(a, clock.callback)
    m = json.loads((out / "train_metrics.json").read_text())
    shutil.rmtree(out)  # a full-SFT run folder holds ~4 GB of model and checkpoint: 18 of them filled a disk
    return clock.result(m["train_runtime_seconds"], [p["loss"] for p in m["loss_curve"]]) | {
        "allocator": m["allocator"]}


def trl_worker(a, same_allocator: bool = False) -> dict:
    """TRL as its docs show it: a model path, a dataset and SFTConfig defaults (bf16, gradient checkpointing, ...)."""
    import torch

    from gsmtune.allocator import keep_freed_memory, status

    if same_allocator:
        keep_freed_memory()
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from gsmtune.config import load_config
    from gsmtune.data import train_validation_split
    from gsmtune.models import load_tokenizer, resolve_model_path
    from gsmtune.training.sft_data import sft_rows

    cfg = load_config(None, settings(a))
    path = resolve_model_path(cfg.model.name)
    rows = sft_rows(train_validation_split(cfg)[0], cfg, load_tokenizer(path))
    lc = cfg.training.lora
    peft = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                      task_type="CAUSAL_LM") if a.method == "lora" else None
    args = SFTConfig(output_dir=(scratch := tempfile.mkdtemp()), per_device_train_batch_size=a.batch_size,
                     gradient_accumulation_steps=a.accumulation, max_steps=a.max_steps, learning_rate=LR[a.method],
                     lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to=[], seed=cfg.seed,
                     data_seed=cfg.seed, include_num_input_tokens_seen="non_padding", completion_only_loss=True,
                     use_cpu=not torch.cuda.is_available())  # transformers refuses bf16 on CPU without it
    clock = StepClock()
    trainer = SFTTrainer(model=path, args=args, train_dataset=Dataset.from_list(rows), peft_config=peft,
                         callbacks=[clock.callback])
    result = trainer.train()
    shutil.rmtree(scratch)
    return clock.result(result.metrics["train_runtime"], [h["loss"] for h in trainer.state.log_history if "loss" in h]) | {
        "allocator": status()}


def run_worker(args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    subprocess.run([sys.executable, str(Path(__file__).resolve()), *args, "--out", out], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.loads(Path(out).read_text())
    Path(out).unlink()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="folder with GSM8K train.jsonl")
    p.add_argument("--n", type=int, default=256, help="training problems (the first N of train)")
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=11, help="optimizer steps; the first is excluded from the speed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sides", default="gsmtune,trl,trl_alloc",
                   help="gsmtune alone measures a lever (with key=value overrides)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "train.json")
    p.add_argument("--worker", choices=["gsmtune", "trl", "trl_alloc"], help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="key=value overrides for the gsmtune side (a lever to measure)")
    p.add_argument("--render", type=Path, help="print the table of a saved result file and exit")
    a = p.parse_args()
    if a.max_steps < 2:
        p.error("--max-steps must be at least 2 (the first step is not timed)")
    if a.render:
        render(json.loads(a.render.read_text()))
        return
    if a.worker:
        result = gsmtune_worker(a) if a.worker == "gsmtune" else trl_worker(a, same_allocator=a.worker == "trl_alloc")
        a.out.write_text(json.dumps(result))
        return

    folder = first_problems(a.data, a.n)
    common = ["--batch-size", str(a.batch_size), "--accumulation", str(a.accumulation), "--max-steps", str(a.max_steps),
              "--folder", str(folder)]
    table = []
    for method in a.methods.split(","):
        row = {"method": method}
        for side in a.sides.split(","):
            runs = []
            for i in range(a.repeats):
                runs.append(run_worker(["--worker", side, "--method", method, *common, *(a.extra if side == "gsmtune" else [])]))
                print(f"{method} {side} run {i + 1}: {runs[-1]['steady_tokens_per_s']:.1f} tokens/s", file=sys.stderr,
                      flush=True)
            row[side] = {"runs": runs, "tokens_per_s": statistics.median(r["steady_tokens_per_s"] for r in runs),
                         "s_per_step": statistics.median(r["steady_s_per_step"] for r in runs),
                         "peak_rss_gib": max(r["peak_rss_gib"] for r in runs), "losses": runs[0]["losses"],
                         "allocator": runs[0]["allocator"]}
        table.append(row)

    import torch
    import transformers
    import trl

    header = (f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
              f"{transformers.__version__}, trl {trl.__version__}; first {a.n} train problems, batch {a.batch_size} x "
              f"accumulation {a.accumulation}, {a.max_steps} steps (speed over steps 2-{a.max_steps}), median of "
              f"{a.repeats}; gsmtune overrides: {a.extra or 'none'}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"n": a.n, "header": header, "args": vars(a) | {"data": str(a.data), "out": str(a.out)},
                                 "table": table}, indent=1, default=str))
    render(json.loads(a.out.read_text()))


def render(data: dict) -> None:
    """The markdown table of a saved run (`--render FILE` prints it again)."""
    print(f"\n{data.get('header', '')}\n")
    print("| method | side | steady tokens/s | s/step | peak RSS GiB | mean loss | max per-step loss diff vs TRL | x TRL | "
          "x TRL, same allocator | allocator |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in data["table"]:
        sides = [k for k in row if k != "method"]
        for side in sides:
            r = row[side]
            ratio = {ref: f"{r['tokens_per_s'] / row[ref]['tokens_per_s']:.2f}" if ref in row else "-"
                     for ref in ("trl", "trl_alloc")}
            diff = (f"{max(abs(x - y) / y for x, y in zip(r['losses'], row['trl']['losses'], strict=True)):.2%}"
                    if "trl" in row else "-")
            print(f"| {row['method']} | {side} | {r['tokens_per_s']:.0f} | {r['s_per_step']:.1f} | {r['peak_rss_gib']:.1f} | "
                  f"{statistics.mean(r['losses']):.4f} | {diff} | {ratio['trl']} | {ratio['trl_alloc']} | "
                  f"{r['allocator']} |")
        runs = {side: [round(x["steady_tokens_per_s"], 1) for x in row[side]["runs"]] for side in sides}
        losses = {side: [round(x, 4) for x in row[side]["losses"]] for side in sides}
        print(f"\n{row['method']} runs (steady tokens/s): {runs}\n{row['method']} losses per step: {losses}\n")


if __name__ == "__main__":
    main()
