"""This machine's limit for training the bundled Gemma 3 270M: matmul peak at the model's shapes, FLOPs per token.

    python benchmarks/roofline.py --data ../shared/data/gsm8k

Measures bf16 and float32 matrix products at the shapes a training step runs (the MLP and attention projections on
2,048 rows, the 262k-row output layer), counts the FLOPs one trained token costs (LoRA and full, output layer on answer
tokens only, no recomputation), and prints the tokens/s a step would reach if every product ran at the measured peak
of the faster dtype.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def tflops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times) / 1e12


def flops_per_token(config, answer_fraction: float) -> dict[str, float]:
    """Training FLOPs per non-padding token: 2 per weight per token forward, the same again for input gradients, and
    again for weight gradients (full only); the output layer only on the `answer_fraction` of tokens that carry loss."""
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    body = 2 * layers * (h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size)
    head = 2 * vocab * h
    return {"forward_body": body, "forward_head_per_answer_token": head,
            "lora": 2 * body + answer_fraction * 2 * head, "full": 3 * body + answer_fraction * 3 * head}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with GSM8K train.jsonl (for the answer-token share)")
    p.add_argument("--n", type=int, default=256, help="first N train problems, as bench_train.py uses")
    a = p.parse_args()

    from omegaconf import OmegaConf
    from transformers import AutoConfig

    from gsmtune.config import Config
    from gsmtune.data import Problem
    from gsmtune.models import load_tokenizer, resolve_model_path
    from gsmtune.training.sft_data import sft_rows

    path = resolve_model_path("bundled:gemma-3-270m")
    config = AutoConfig.from_pretrained(path).get_text_config()
    lines = (a.data / "train.jsonl").read_text().splitlines()[: a.n]
    problems = [Problem(index=i, question=r["question"], answer=r["answer"]) for i, r in enumerate(map(json.loads, lines))]
    rows = sft_rows(problems, OmegaConf.structured(Config), load_tokenizer(path))
    tokens = sum(len(r["input_ids"]) for r in rows)
    answer = sum(sum(r["completion_mask"]) for r in rows)

    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = {"MLP up (2048 x 640 x 2048)": (2048, h, f), "MLP down (2048 x 2048 x 640)": (2048, f, h),
              "output layer (1024 x 640 x 262144)": (1024, h, v)}
    peak = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| product | bf16 TFLOP/s | float32 TFLOP/s |\n|---|---|---|")
    for name, (m, k, n) in shapes.items():
        bf16, fp32 = tflops(m, k, n, torch.bfloat16), tflops(m, k, n, torch.float32)
        peak[name] = {"bf16": bf16, "float32": fp32}
        print(f"| {name} | {bf16:.2f} | {fp32:.2f} |")
    # the dtype gsmtune trains in here is the faster one: bf16 where the CPU runs it natively, else float32
    dtype, best = max(((d, max(p[d] for p in peak.values())) for d in ("bf16", "float32")), key=lambda x: x[1])
    counts = flops_per_token(config, answer / tokens)
    print(f"\n{a.n} problems: {tokens} tokens, {answer} with loss ({answer / tokens:.1%})")
    print(f"forward: {counts['forward_body'] / 1e6:.0f} MFLOP/token body, {counts['forward_head_per_answer_token'] / 1e6:.0f} "
          "MFLOP per answer token output layer")
    for method in ("lora", "full"):
        print(f"{method}: {counts[method] / 1e9:.3f} GFLOP per trained token -> roofline {best * 1e12 / counts[method]:.0f} "
              f"tokens/s at the best {dtype} peak measured ({best:.2f} TFLOP/s)")


if __name__ == "__main__":
    main()
