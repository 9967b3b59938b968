"""Timed bf16 LoRA and full SFT steps on a tiny random Gemma 3, on CUDA: a smoke test of the GPU training path.

These timings say the path runs end to end (model, 8-bit AdamW, bf16, checkpoints, metrics); a tiny model says
nothing about real speed, so they are labelled smoke timings wherever they are reported.

    python benchmarks/gpu_smoke.py --out smoke.json
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path


def tiny_tokenizer():
    """A byte-level BPE trained on a few hundred synthetic problems (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([q + "\n" + a for q, a in problems(200)],
                            trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def problems(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        rows.append((f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                     f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"))
    return rows


def main() -> None:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from gsmtune.cli import main as gsmtune

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_smoke.json")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda", help="cpu only to try the script without a GPU")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gsmtune-gpu-smoke-"))
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=64, sliding_window=128,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Gemma3ForCausalLM(config).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "data"
    data.mkdir()
    for split, n in (("train", 640), ("test", 32)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                                      for q, a in problems(n, seed=len(split))))
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    results = {"device": name, "torch": torch.__version__, "steps": args.steps,
               "note": "smoke timings on a tiny random model (hidden 256, 4 layers): not a measure of real speed"}
    for method in ("lora", "full"):
        out = root / method
        code = gsmtune(["train", "base", f"model.name={root / 'model'}", "dataset.source=local", f"dataset.path={data}",
                        f"model.device={args.device}", "training.bf16=true", "training.optim=adamw_bnb_8bit",
                        f"training.method={method}", f"training.max_steps={args.steps}", "training.logging_steps=1",
                        "training.per_device_train_batch_size=8", "training.gradient_accumulation_steps=1",
                        "training.save_steps=1000", f"output_dir={out}"])
        m = json.loads((out / "train_metrics.json").read_text()) if code == 0 else {}
        results[method] = {"exit_code": code, **{k: m.get(k) for k in (
            "optimizer", "precision", "global_step", "tokens_seen", "tokens_per_second", "train_runtime_seconds",
            "peak_memory_gib", "final_loss")}, "first_loss": (m.get("loss_curve") or [{}])[0].get("loss")}
        print(f"{method}: {results[method]}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
