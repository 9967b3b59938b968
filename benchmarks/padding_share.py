"""The share of a training batch's token slots that are padding, for GSM8K rows as gsmtune tokenizes them.

Batches padded to their longest row compute on padding too (every linear layer runs on every slot), so this share is
an upper bound on what padding-free or length-grouped batches could save. No model runs: tokenizer only.

    python benchmarks/padding_share.py --data ../shared/data/gsm8k --config main --batch 8
"""

from __future__ import annotations

import argparse
import random


def padded(lengths: list[int], order: list[int], batch: int) -> int:
    return sum(max(lengths[i] for i in order[b: b + batch]) * len(order[b: b + batch]) for b in range(0, len(order), batch))


def main() -> None:
    from transformers import AutoTokenizer

    from gsmtune.config import load_config
    from gsmtune.data import load_split
    from gsmtune.models import resolve_model_path
    from gsmtune.training.sft_data import sft_rows

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--config", default="main", choices=("main", "socratic"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--group", type=int, default=50, help="length grouping: sort within mega-batches of this many batches")
    args = p.parse_args()
    cfg = load_config(None, ["dataset.source=local", f"dataset.path={args.data}", f"dataset.config_name={args.config}"])
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.name))
    rows = sft_rows(load_split(cfg.dataset, "train"), cfg, tokenizer)
    lengths = [len(r["input_ids"]) for r in rows]  # BOS + prompt + solution + EOS, as training sees them
    order = list(range(len(lengths)))
    random.Random(cfg.seed).shuffle(order)
    real = sum(lengths)
    mega = args.batch * args.group
    grouped = [i for m in range(0, len(order), mega) for i in sorted(order[m: m + mega], key=lambda i: -lengths[i])]
    print(f"{args.config}: {len(lengths)} rows, {real:,} tokens, longest {max(lengths)}; batch {args.batch}: padding is "
          f"{1 - real / padded(lengths, order, args.batch):.1%} of the slots in random batches, "
          f"{1 - real / padded(lengths, grouped, args.batch):.1%} grouped by length")


if __name__ == "__main__":
    main()
