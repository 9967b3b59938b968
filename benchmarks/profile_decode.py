"""Where decode time goes in gsmtune's loop: model forward (prefill / decode steps, by running batch size) vs host work.

    python benchmarks/profile_decode.py --data ../shared/data/gsm8k --n 64 [--model RUN/model] [--dtype float32]
    python benchmarks/profile_decode.py --step-sweep   # one decode step's time at batch 1..64 vs the memory floor
    python benchmarks/profile_decode.py --data ... --model RUN/model --dtype float32 --screen both   # the screen's lever
    python benchmarks/profile_decode.py ... --samples 5   # self-consistency's sampling (temperature 0.7, top-k 50)
    python benchmarks/profile_decode.py --data ... --drafts both   # drafts looked up in each row: off, then on
    python benchmarks/profile_decode.py --data ... --batch-invariant both   # plain, then generation.batch_invariant
    python benchmarks/profile_decode.py --data ... --pack both   # bf16 weights packed for oneDNN: off, then on

Runs `gsmtune.generation.stream` as `gsmtune eval` does (zero-shot prompts sorted by length, greedy or, with
--samples, self-consistency's sampling; the '####' and 'Question:' stops) with a clock around every model call.
Generated tokens are counted as everywhere in gsmtune's benchmarks: the tokens of each kept completion (cut at its
stop rule, EOS excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

BUCKETS = ((1, 6), (7, 16), (17, 32), (33, 64), (65, 1024))


def bandwidth_gb_s(megabytes: int = 1024, repeats: int = 5) -> float:
    """Memory bandwidth as a big copy sees it (read + write), the floor a decode step cannot beat."""
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() / statistics.median(times) / 1e9


def weight_bytes(model) -> int:
    """Bytes one decode step must read: every weight once (the tied embedding counted once, as the output layer)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def step_sweep(lm, context: int, sizes: list[int], repeats: int = 5) -> list[dict]:
    """Median time of one decode step at each batch size, `context` positions already cached (greedy: the output
    layer screened and bf16 weights packed as the decode loop does)."""
    from gsmtune.generation import _prefill
    from gsmtune.output_screen import screened_output_layer
    from gsmtune.packed_weights import packed_linears

    rows = []
    for b in sizes:
        prompts = [[lm.tokenizer.bos_token_id] + [1000 + i] * (context - 1) for i in range(b)]
        with torch.inference_mode(), packed_linears(lm.model), screened_output_layer(lm.model):
            _, cache, mask = _prefill(lm.model, prompts, lm.tokenizer.pad_token_id, lm.device)
            times = []
            for _ in range(repeats):
                mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
                start = time.perf_counter()
                lm.model(input_ids=torch.full((b, 1), 1000), attention_mask=mask,
                         position_ids=mask.sum(-1, keepdim=True) - 1, cache=cache, use_cache=True)
                times.append(time.perf_counter() - start)
        rows.append({"batch": b, "ms": 1e3 * statistics.median(times), "tokens_per_s": b / statistics.median(times)})
    return rows


def profile_stream(lm, prompts: list[list[int]], gen_cfg, batch_size: int, keys: list | None = None) -> dict:
    from gsmtune.generation import StopRules, stream

    forward = lm.model.forward
    calls: list[tuple[int, int, bool, float]] = []  # (rows, positions fed a row, prefill?, seconds)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        calls.append((*kwargs["input_ids"].shape, "logits_to_keep" in kwargs, time.perf_counter() - start))
        return out

    head = lm.model.get_output_embeddings()
    screen = getattr(head, "_gsmtune_screen", None)
    before = (screen.proven, screen.recomputed) if screen is not None else (0, 0)
    lm.model.forward = timed
    start = time.perf_counter()
    done = dict(stream(lm.model, lm.tokenizer, prompts, gen_cfg, StopRules(), batch_size=batch_size,
                       sample_keys=keys))
    wall = time.perf_counter() - start
    lm.model.forward = forward
    screen = getattr(head, "_gsmtune_screen", None)  # output_screen's counts of rows proven / recomputed in float32
    screened = (screen.proven - before[0], screen.recomputed - before[1]) if screen is not None else (0, 0)
    decode = [(rows, width, s) for rows, width, prefill, s in calls if not prefill]
    buckets = defaultdict(list)
    for rows, width, s in decode:
        buckets[next(f"{lo}-{hi}" for lo, hi in BUCKETS if rows <= hi)].append((width, s))
    tokens = sum(len(lm.tokenizer(c.text, add_special_tokens=False)["input_ids"]) for c in done.values())
    return {"wall_s": wall, "prefill_s": sum(s for *_, prefill, s in calls if prefill),
            "decode_s": sum(s for *_, s in decode), "host_s": wall - sum(s for *_, s in calls), "steps": len(decode),
            "steps_with_drafts": sum(width > 1 for _, width, _ in decode), "tokens": tokens,
            "tokens_per_s": tokens / wall,
            "by_batch": {k: {"steps": len(v), "ms_per_step": 1e3 * statistics.median(s for _, s in v),
                             "s": sum(s for _, s in v), "mean_positions_per_row": statistics.mean(w for w, _ in v)}
                         for k, v in sorted(buckets.items(), key=lambda kv: int(kv[0].split("-")[0]))},
            "stops": dict(Counter(c.stop_reason for c in done.values())),
            "screen_rows_proven": screened[0], "screen_rows_recomputed": screened[1],
            "completions": [done[i].text for i in range(len(prompts))]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="folder with GSM8K test.jsonl")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--model", default="bundled:gemma-3-270m", help="a model folder, an adapter folder or bundled:NAME")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--screen", choices=("on", "off", "both"), default="on",
                   help="output_screen (float32 on CPU); both: off then on, in one process, same completions checked")
    p.add_argument("--drafts", choices=("auto", "on", "off", "both"), default="auto",
                   help="greedy drafts looked up in each row: generation.draft_tokens null (auto), 8 (on) or 0 (off); "
                        "both: off then on, in one process, same completions checked")
    p.add_argument("--batch-invariant", choices=("on", "off", "both"), default="off",
                   help="generation.batch_invariant; both: off then on, in one process, identical completions counted")
    p.add_argument("--pack", choices=("on", "off", "both"), default="on",
                   help="bf16 weights packed for oneDNN (packed_weights, GSMTUNE_PACK); both: off then on, in one "
                        "process, identical completions counted")
    p.add_argument("--samples", type=int, default=0,
                   help="k sampled completions per problem (temperature 0.7, top-k 50) instead of greedy")
    p.add_argument("--step-sweep", action="store_true", help="time one decode step per batch size instead")
    p.add_argument("--context", type=int, default=300, help="cached positions for --step-sweep")
    p.add_argument("--out", type=Path)
    a = p.parse_args()

    from omegaconf import OmegaConf

    from gsmtune.allocator import keep_freed_memory
    from gsmtune.config import load_config
    from gsmtune.models import load_model
    from gsmtune.prompts import tokenize_prompt

    keep_freed_memory()
    lm = load_model(a.model, dtype=a.dtype)
    floor_ms = 1e3 * weight_bytes(lm.model) / (bandwidth_gb_s() * 1e9)  # a step reads the weights once
    header = {"model": a.model, "dtype": a.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "weights_gb": weight_bytes(lm.model) / 1e9, "memory_floor_ms_per_step": floor_ms}
    if a.step_sweep:
        if "both" in (a.screen, a.pack):
            p.error("--step-sweep measures one setting: --screen and --pack take on or off")
        os.environ["GSMTUNE_SCREEN"], os.environ["GSMTUNE_PACK"] = a.screen, a.pack
        result = header | {"context": a.context, "steps": step_sweep(lm, a.context, [1, 2, 4, 8, 16, 32, 48, 64, 96])}
    else:
        sampling = [f"generation.do_sample={a.samples > 0}", "generation.temperature=0.7", "generation.top_k=50"]
        gen = load_config(None, [f"generation.max_new_tokens={a.max_new_tokens}", *sampling]).generation
        with (a.data / "test.jsonl").open() as f:
            questions = [json.loads(next(f))["question"] for _ in range(a.n)]
        prompts = sorted((tokenize_prompt(f"Question: {q}\nAnswer:", lm.tokenizer) for q in questions), key=len)
        k = max(a.samples, 1)
        prompts, keys = [p for p in prompts for _ in range(k)], [f"{i}/{j}" for i in range(a.n) for j in range(k)]
        result = header | {"n": a.n, "samples": a.samples, "batch_size": a.batch_size, "max_new_tokens": a.max_new_tokens}
        levers = {"screen": a.screen, "drafts": a.drafts, "batch_invariant": a.batch_invariant, "pack": a.pack}
        both = [name for name, value in levers.items() if value == "both"]
        if len(both) > 1:
            p.error(f"{' and '.join(both)} are both 'both': measure one lever at a time")
        runs = [(f"{both[0]}_{side}", levers | {both[0]: side}) for side in ("off", "on")] if both else [("run", levers)]
        for name, run in runs:
            os.environ["GSMTUNE_SCREEN"], os.environ["GSMTUNE_PACK"] = run["screen"], run["pack"]
            cfg = OmegaConf.merge(gen, {"draft_tokens": {"auto": None, "off": 0}.get(run["drafts"], 8),
                                        "batch_invariant": run["batch_invariant"] == "on"})
            result[name] = profile_stream(lm, prompts, cfg, a.batch_size, keys)
        if len(runs) == 2:
            pairs = zip(*(result[name]["completions"] for name, *_ in runs), strict=True)
            result["identical_completions"] = sum(x == y for x, y in pairs)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "completions"} if isinstance(v, dict) else v
                      for k, v in result.items()}, indent=1))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
