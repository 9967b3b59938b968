"""Evaluation speed on one machine: gsmtune vs lm-evaluation-harness vs a naive one-problem-per-`generate` loop.

Same model (bundled Gemma 3 270M, bf16), same first N GSM8K test problems, same prompt (`Question: q\\nAnswer:`, one
BOS), greedy, same max_new_tokens and the same stop (a new line starting `Question:`, or EOS). Each contender runs in
its own process, `--repeats` times; the table reports the median. lm-eval runs in its own virtual environment:

    python -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install torch "lm-eval[hf]"
    python benchmarks/bench_eval.py --data ../shared/data/gsm8k --lm-eval-python /tmp/lmeval/bin/python
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def gsmtune_worker(problems: Path, batch_size: int, max_new_tokens: int, stop_at_answer: bool, dtype: str,
                   overrides: list[str]) -> dict:
    import transformers  # noqa: F401  (imported before the clock starts, as lm-eval's worker does)

    from gsmtune.config import load_config
    from gsmtune.evaluate import run_eval

    environment = [o for o in overrides if o.split("=", 1)[0].isupper()]  # GSMTUNE_PACK=off: a variable, not a key
    os.environ.update(o.split("=", 1) for o in environment)
    out = Path(tempfile.mkdtemp())
    cfg = load_config(None, ["dataset.source=local", f"dataset.path={problems.parent}", "prompt.strategy=zero_shot",
                             "num_eval_samples=null", f"generation.batch_size={batch_size}", f"model.dtype={dtype}",
                             f"generation.max_new_tokens={max_new_tokens}", f"generation.stop_at_answer={stop_at_answer}",
                             f"output_dir={out}", *(o for o in overrides if o not in environment)])
    start = time.perf_counter()
    run_eval(cfg)
    seconds = time.perf_counter() - start
    rows = sorted((json.loads(line) for line in (out / "predictions.jsonl").open()), key=lambda r: r["index"])
    return {"seconds": seconds, "completions": [r["completion"] for r in rows], "prompts": [r["prompt"] for r in rows]}


def naive_worker(problems: Path, max_new_tokens: int, dtype: str) -> dict:
    """The floor: one `generate` call per problem, HF's own stop strings."""
    import torch

    from gsmtune.generation import StopRules, stop_token_ids
    from gsmtune.models import load_model
    from gsmtune.prompts import tokenize_prompt

    start = time.perf_counter()  # after the imports, like the other contenders
    lm = load_model("bundled:gemma-3-270m", dtype=dtype)
    rules, completions, prompts = StopRules(at_answer=False), [], []
    for line in problems.open():
        prompt = f"Question: {json.loads(line)['question']}\nAnswer:"
        ids = torch.tensor([tokenize_prompt(prompt, lm.tokenizer)])
        with torch.inference_mode():
            out = lm.model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=stop_token_ids(lm.tokenizer, lm.model), stop_strings=["\nQuestion:"],
                                    tokenizer=lm.tokenizer)
        text = lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        stop = rules.find(text)
        completions.append(text if stop is None else text[: stop[0]])
        prompts.append(prompt)
    return {"seconds": time.perf_counter() - start, "completions": completions, "prompts": prompts}


def run_worker(args: list[str], python: str = sys.executable) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    subprocess.run([python, *args, out], check=True, stdout=subprocess.DEVNULL)
    return json.loads(Path(out).read_text())


def measure(name: str, args: list[str], repeats: int, python: str = sys.executable) -> dict:
    runs = []
    for i in range(repeats):
        runs.append(run_worker(args, python))
        print(f"{name} run {i + 1}/{repeats}: {runs[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    times = [r["seconds"] for r in runs]
    return {"name": name, "seconds": times, "median_seconds": statistics.median(times), "completions": runs[0]["completions"],
            "prompts_sha256": prompts_digest(runs[0]["prompts"])}


def prompts_digest(prompts: list[str]) -> str:
    """The prompts' fingerprint: enough to show every contender got the same text, without a copy of the test set."""
    return hashlib.sha256("\0".join(prompts).encode("utf-8")).hexdigest()


def answers(texts: list[str]) -> list[tuple[str | None, str | None]]:
    from gsmtune.answers import extract_flexible, extract_strict

    return [(extract_strict(t), extract_flexible(t)) for t in texts]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with GSM8K test.jsonl")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="gsmtune's generation.batch_size")
    p.add_argument("--lm-eval-python", help="python of a virtual environment with lm-eval[hf]; omit to skip lm-eval")
    p.add_argument("--lm-eval-batch-sizes", default="16,32,64", help="tried once each; the fastest is then repeated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--dtype", default="bfloat16", help="float32 shows whether disagreements are bf16 rounding")
    # under results/, with the run folders: the completions can quote test problems (the base model runs on into them)
    p.add_argument("--out", type=Path, default=HERE.parent / "results" / "benchmarks" / "eval.json")
    p.add_argument("--also", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="one more gsmtune contender (stopping at '#### n') with these config overrides, to measure a "
                        "lever in the same run, e.g. --also generation.draft_tokens=0 (an upper-case KEY sets an environment "
                        "variable instead: --also GSMTUNE_PACK=off); repeatable")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:  # inside a contender's own process
        kind, *rest, out = a.worker
        problems = Path(rest[0])
        result = (gsmtune_worker(problems, int(rest[1]), int(rest[2]), rest[3] == "true", a.dtype, rest[4:])
                  if kind == "gsmtune"
                  else naive_worker(problems, int(rest[1]), a.dtype))
        Path(out).write_text(json.dumps(result))
        return

    folder = Path(tempfile.mkdtemp())
    with (a.data / "test.jsonl").open() as f:
        (folder / "test.jsonl").write_text("".join(next(f) for _ in range(a.n)))
    problems = folder / "test.jsonl"
    me = [str(Path(__file__).resolve()), "--data", str(a.data), "--dtype", a.dtype, "--worker"]
    tok = str(a.max_new_tokens)
    results = [measure("gsmtune", [*me, "gsmtune", str(problems), str(a.batch_size), tok, "false"], a.repeats)]
    results.append(measure("gsmtune, also stopping at the '#### n' line",
                           [*me, "gsmtune", str(problems), str(a.batch_size), tok, "true"], a.repeats))
    for overrides in a.also:
        results.append(measure(f"gsmtune, stopping at '#### n', {overrides}",
                               [*me, "gsmtune", str(problems), str(a.batch_size), tok, "true", *overrides.split(",")],
                               a.repeats))
    if a.lm_eval_python:
        from gsmtune.models import bundled_model_path

        worker = [str(HERE / "lm_eval_worker.py"), str(problems), str(bundled_model_path("gemma-3-270m")), a.dtype]
        trials = {bs: run_worker([*worker, bs, tok], a.lm_eval_python)["seconds"] for bs in a.lm_eval_batch_sizes.split(",")}
        print(f"lm-eval batch sizes tried (s): {trials}", file=sys.stderr)
        best = min(trials, key=trials.get)
        results.append(measure(f"lm-eval (HF backend, batch {best})", [*worker, best, tok], a.repeats, a.lm_eval_python)
                       | {"batch_size_trials": trials})
    if not a.skip_naive:
        results.append(measure("naive loop (batch 1)", [*me, "naive", str(problems), tok], a.repeats))

    from transformers import AutoTokenizer

    from gsmtune.models import bundled_model_path

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path("gemma-3-270m"))
    reference = results[0]
    for r in results:
        r["tokens"] = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in r["completions"])
        r["problems_per_s"] = a.n / r["median_seconds"]
        r["tokens_per_s"] = r["tokens"] / r["median_seconds"]
        r["same_prompts"] = r["prompts_sha256"] == reference["prompts_sha256"]
        r["same_text"] = sum(x.strip() == y.strip() for x, y in zip(r["completions"], reference["completions"], strict=True))
        pairs = zip(answers(r["completions"]), answers(reference["completions"]), strict=True)
        r["same_answer"] = sum(x == y for x, y in pairs)
    lm_eval = next((r for r in results if r["name"].startswith("lm-eval")), None)

    import torch
    import transformers

    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {a.dtype}; n={a.n}, max_new_tokens={a.max_new_tokens}, median of {a.repeats}\n")
    print("| contender | median s | runs (s) | problems/s | gen tokens/s | x lm-eval | same text / answer as gsmtune |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{lm_eval['median_seconds'] / r['median_seconds']:.2f}" if lm_eval else "-"
        print(f"| {r['name']} | {r['median_seconds']:.1f} | {', '.join(f'{s:.1f}' for s in r['seconds'])} | "
              f"{r['problems_per_s']:.2f} | {r['tokens_per_s']:.0f} | {ratio} | {r['same_text']} / {r['same_answer']} of {a.n} |")
    if lm_eval:
        for i, (x, y) in enumerate(zip(lm_eval["completions"], reference["completions"], strict=True)):
            if answers([x]) != answers([y]):
                print(f"\nproblem {i}: answers differ\n  lm-eval: {x[:300]!r}\n  gsmtune: {y[:300]!r}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"n": a.n, "max_new_tokens": a.max_new_tokens, "results": results}, indent=1))


if __name__ == "__main__":
    main()
