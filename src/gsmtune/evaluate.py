"""Evaluate a model on GSM8K: `predictions.jsonl` written as it goes (so `--resume` loses nothing), then `metrics.json`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from gsmtune.answers import answers_match, extract_flexible, extract_strict, gold_answer
from gsmtune.data import Problem, load_eval_problems, load_split
from gsmtune.model_card import write_model_card
from gsmtune.runs import METRICS, MODEL, PREDICTIONS, prepare, read_predictions, write_atomic, write_provenance
from gsmtune.stats import wilson_ci


def score(problem: Problem, prompt: str, completion) -> dict:
    gold = gold_answer(problem.answer)
    strict, flexible = extract_strict(completion.text), extract_flexible(completion.text)
    return {
        "index": problem.index,
        "question": problem.question,
        "gold": gold,
        "gold_solution": problem.answer,
        "prompt": prompt,
        "completion": completion.text,
        "extracted_strict": strict,
        "extracted_flexible": flexible,
        "correct": answers_match(strict, gold),
        "correct_flexible": answers_match(flexible, gold),
        "num_tokens": completion.num_tokens,
        "stop_reason": completion.stop_reason,
        "calculator_calls": completion.calculator_calls,
        "calculator_changed": completion.calculator_changed,
    }


def majority_vote(answers: list[str | None]) -> str | None:
    """The most frequent extracted answer (numerically equal ones pooled); ties go to the one sampled first."""
    counts: dict[float, int] = {}
    first: dict[float, str] = {}
    for a in answers:
        if a is None:
            continue
        key = float(a)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, a)
    if not counts:
        return None
    best = max(counts.values())
    return next(first[float(a)] for a in answers if a is not None and counts[float(a)] == best)


def add_samples(row: dict, samples: list) -> dict:
    """Self-consistency fields: every sample, the majority answer, maj@k and pass@k correctness."""
    answers = [extract_strict(c.text) for c in samples]
    majority = majority_vote(answers)
    row["samples"] = [{"completion": c.text, "extracted_strict": a, "correct": answers_match(a, row["gold"]),
                       "num_tokens": c.num_tokens, "stop_reason": c.stop_reason, "calculator_calls": c.calculator_calls,
                       "calculator_changed": c.calculator_changed} for c, a in zip(samples, answers, strict=True)]
    row["majority_answer"] = majority
    row["correct_majority"] = answers_match(majority, row["gold"])
    row["correct_pass_at_k"] = any(s["correct"] for s in row["samples"])
    row["num_tokens"] += sum(c.num_tokens for c in samples)
    return row


def compute_metrics(rows: list[dict], cfg: DictConfig, wall_time: float) -> dict:
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    flexible = sum(r["correct_flexible"] for r in rows)
    tokens = sum(r["num_tokens"] for r in rows)
    gen_seconds = sum(r["seconds"] for r in rows)
    lo, hi = wilson_ci(correct, n)
    return {
        "accuracy": correct / n if n else 0.0,
        "correct": correct,
        "total": n,
        "ci95": [lo, hi],
        "accuracy_strict": correct / n if n else 0.0,
        "accuracy_flexible": flexible / n if n else 0.0,
        "ci95_flexible": list(wilson_ci(flexible, n)),
        "no_answer_rate": sum(r["extracted_strict"] is None for r in rows) / n if n else 0.0,
        "truncation_rate": sum(r["stop_reason"] == "max_tokens" for r in rows) / n if n else 0.0,
        "tokens_generated": tokens,
        "tokens_per_second": tokens / gen_seconds if gen_seconds else 0.0,
        "problems_per_second": n / gen_seconds if gen_seconds else 0.0,
        "generation_seconds": gen_seconds,
        "wall_time_seconds": wall_time,
        "model": cfg.model.name,
        "dataset": f"{cfg.dataset.source}:{cfg.dataset.name}/{cfg.dataset.config_name}/{cfg.dataset.eval_split}",
        "prompt_strategy": cfg.prompt.strategy,
        "num_shots": {"zero_shot": 0, "one_shot": 1}.get(cfg.prompt.strategy, cfg.prompt.num_shots),
        "instruction": cfg.prompt.instruction,
        "chat_template": cfg.prompt.chat_template,
        "seed": cfg.seed,
        "num_eval_samples": cfg.num_eval_samples,
    } | _extra_metrics(rows, cfg)


def _extra_metrics(rows: list[dict], cfg: DictConfig) -> dict:
    """maj@k / pass@k beside greedy for self-consistency runs; calculator use for calculator runs."""
    n, extra = len(rows), {}
    if cfg.generation.num_samples > 1 and n:
        k, maj = cfg.generation.num_samples, sum(r["correct_majority"] for r in rows)
        extra |= {f"accuracy_maj_at_{k}": maj / n, f"ci95_maj_at_{k}": list(wilson_ci(maj, n)),
                  f"accuracy_pass_at_{k}": sum(r["correct_pass_at_k"] for r in rows) / n,
                  "accuracy_greedy": sum(r["correct"] for r in rows) / n}
    if cfg.generation.calculator:
        extra |= {"calculator_calls": sum(r["calculator_calls"] for r in rows),
                  "calculator_changed": sum(r["calculator_changed"] for r in rows),
                  "problems_with_calculator_calls": sum(r["calculator_calls"] > 0 for r in rows)}
        samples = [s for r in rows for s in r.get("samples", [])]
        if samples and all("calculator_calls" in s for s in samples):  # runs begun before 6514217 lack them
            extra |= {"sample_calculator_calls": sum(s["calculator_calls"] for s in samples),
                      "sample_calculator_changed": sum(s["calculator_changed"] for s in samples)}
    return extra


def run_eval(cfg: DictConfig, resume: bool = False, overwrite: bool = False, model_path: str | None = None) -> dict:
    """The in-context or fine-tuned evaluation of one config; returns its metrics.

    `model_path` replaces `model.name` for the weights (a trained run evaluates its own RUN/model folder).
    """
    from gsmtune.allocator import keep_freed_memory, release_freed_memory
    from gsmtune.models import load_model, pick_device, pick_dtype
    from gsmtune.prompts import build_prompt, shots_for, tokenize_prompt

    device = pick_device(cfg.model.device)
    if device.type == "cpu":
        keep_freed_memory()  # before the model loads: see allocator.py
        release_freed_memory()  # what an earlier stage of this process freed
    start = time.time()
    problems = load_eval_problems(cfg)
    train = load_split(cfg.dataset, "train") if cfg.prompt.strategy == "few_shot" else None
    shots = shots_for(cfg.prompt, train)
    finished = (resume and not overwrite and (Path(cfg.output_dir) / METRICS).exists()
                and {p.index for p in problems} <= read_predictions(Path(cfg.output_dir) / PREDICTIONS).keys())
    out = prepare(cfg, resume, overwrite, finished)
    if finished:  # its metrics and provenance stay those of the process that scored it
        print(f"gsmtune: {out} already scored all {len(problems)} problems; nothing to resume", file=sys.stderr)
        return json.loads((out / METRICS).read_text())
    dtype = str(pick_dtype(cfg.model.dtype, device)).removeprefix("torch.")
    pred_path = out / PREDICTIONS
    done = read_predictions(pred_path, repair=True)
    write_provenance(out, "eval", str(device), dtype, model_path or cfg.model.name, continues=bool(done))
    pending = [p for p in problems if p.index not in done]

    if pending:
        lm = load_model(model_path or cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code,
                        cfg.model.attn_implementation)
        prompts = {p.index: build_prompt(p.question, cfg, shots, lm.tokenizer) for p in pending}
        ids = {i: tokenize_prompt(text, lm.tokenizer) for i, text in prompts.items()}
        pending.sort(key=lambda p: len(ids[p.index]))  # similar lengths side by side: less padding when rows join
        bar = tqdm(total=len(problems), initial=len(problems) - len(pending), desc="eval", unit="problem",
                   smoothing=0)  # average rate: self-consistency finishes problems a batch at a time
        tokens, seconds, last = 0, 0.0, time.perf_counter()
        with pred_path.open("a", encoding="utf-8") as f:
            for p, completion, samples in completions(lm, pending, ids, cfg):
                now = time.perf_counter()
                row = score(p, prompts[p.index], completion) | {"seconds": now - last}
                if samples:
                    row = add_samples(row, samples)
                f.write(json.dumps(row) + "\n")
                f.flush()
                done[p.index] = row
                tokens, seconds, last = tokens + row["num_tokens"], seconds + now - last, now
                bar.update(1)
                bar.set_postfix(tok_s=f"{tokens / seconds:.0f}", acc=f"{sum(r['correct'] for r in done.values()) / len(done):.3f}")
        bar.close()

    rows = [done[p.index] for p in problems]
    metrics = compute_metrics(rows, cfg, time.time() - start) | {"model_path": model_path or cfg.model.name,
                                                                  "dtype": dtype}
    write_atomic(out / METRICS, json.dumps(metrics, indent=2) + "\n")
    if model_path and Path(model_path).resolve() == (out / MODEL).resolve():  # `gsmtune run`: the card gets results
        write_model_card(out)
    return metrics


def completions(lm, problems: list[Problem], ids: dict[int, list[int]], cfg: DictConfig) -> Iterator[tuple]:
    """(problem, completion, samples) as they finish. One continuous batch over every problem; with self-consistency,
    per batch of problems: the greedy completions, then k sampled ones each."""
    from gsmtune.generation import StopRules, generate, stream

    rules = StopRules(cfg.generation.stop_at_answer, cfg.generation.stop_at_new_question)
    bs = cfg.generation.batch_size
    if cfg.generation.num_samples <= 1:
        rows, keys = [ids[p.index] for p in problems], [f"{p.index}/0" for p in problems]  # sampled: as SC's first
        for i, completion in stream(lm.model, lm.tokenizer, rows, cfg.generation, rules, seed=cfg.seed, batch_size=bs,
                                    sample_keys=keys):
            yield problems[i], completion, []
        return
    greedy_cfg = OmegaConf.merge(cfg.generation, {"do_sample": False})
    for b in range(0, len(problems), bs):
        batch = problems[b: b + bs]
        batch_ids = [ids[p.index] for p in batch]
        greedy = generate(lm.model, lm.tokenizer, batch_ids, greedy_cfg, rules)
        yield from zip(batch, greedy, sample_completions(lm, batch_ids, cfg, rules, [p.index for p in batch]), strict=True)


def sample_completions(lm, batch_ids: list[list[int]], cfg: DictConfig, rules, keys: list[int]) -> list[list]:
    """k sampled completions per prompt (self-consistency), continuously batched `generation.batch_size` rows at a time.
    Sample j of the prompt keyed i (its problem's index) draws from its own random stream (seed, i, j): the same
    whatever batch or resume it is in."""
    from gsmtune.generation import stream

    k = cfg.generation.num_samples
    sample_cfg = OmegaConf.merge(cfg.generation, {"do_sample": True})
    rows = [ids for ids in batch_ids for _ in range(k)]
    done = dict(stream(lm.model, lm.tokenizer, rows, sample_cfg, rules, seed=cfg.seed, batch_size=cfg.generation.batch_size,
                       sample_keys=[f"{key}/{j}" for key in keys for j in range(k)]))
    return [[done[i * k + j] for j in range(k)] for i in range(len(batch_ids))]


def format_metrics(m: dict) -> str:
    lo, hi = m["ci95"]
    return (
        f"accuracy {m['accuracy']:.1%} ({m['correct']}/{m['total']}, 95% CI {lo:.1%}-{hi:.1%}); "
        f"flexible {m['accuracy_flexible']:.1%}; no answer {m['no_answer_rate']:.1%}; "
        f"truncated {m['truncation_rate']:.1%}; {m['tokens_per_second']:.0f} tok/s"
    )
