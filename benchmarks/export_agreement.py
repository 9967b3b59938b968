"""How closely a GGUF export decodes like the model it came from: `gsmtune export` at each --type, loaded back with
transformers' GGUF loader, greedy float32 completions on N GSM8K test problems beside the source model's.

    python benchmarks/export_agreement.py RUN/model --data ../shared/data/gsm8k -n 16 --out agreement.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def completions(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    from gsmtune.config import load_config
    from gsmtune.generation import StopRules, generate

    gen = load_config(None, [f"generation.max_new_tokens={max_new_tokens}"]).generation
    return [c.text for c in generate(model, tokenizer, prompts, gen, StopRules())]


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from gsmtune.answers import extract_strict
    from gsmtune.config import load_config
    from gsmtune.data import load_split
    from gsmtune.export import TYPES, export_gguf
    from gsmtune.models import load_model
    from gsmtune.prompts import build_prompt, tokenize_prompt

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--data", required=True, help="folder with GSM8K test.jsonl")
    p.add_argument("-n", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--out", default="export_agreement.json")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    cfg = load_config(None, ["dataset.source=local", f"dataset.path={args.data}"])
    source = load_model(args.model, "float32")
    problems = load_split(cfg.dataset, "test")[: args.n]
    prompts = [tokenize_prompt(build_prompt(p.question, cfg, [], source.tokenizer), source.tokenizer) for p in problems]
    reference = completions(source.model, source.tokenizer, prompts, args.max_new_tokens)
    results = {"model": args.model, "problems": args.n, "max_new_tokens": args.max_new_tokens, "types": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for ftype in TYPES:
            start = time.time()
            path = export_gguf(args.model, Path(tmp) / ftype / "model.gguf", ftype)
            seconds = time.time() - start
            back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
            texts = completions(back, source.tokenizer, prompts, args.max_new_tokens)
            same = sum(a == b for a, b in zip(texts, reference, strict=True))
            answers = sum(extract_strict(a) == extract_strict(b) for a, b in zip(texts, reference, strict=True))
            results["types"][ftype] = {"identical_completions": same, "same_strict_answer": answers,
                                       "file_mib": round(path.stat().st_size / 2**20, 1), "export_seconds": round(seconds, 1)}
            print(ftype, results["types"][ftype], flush=True)
            path.unlink()
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
