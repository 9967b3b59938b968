"""Fixtures: a tiny random Gemma-3-shaped model with a tokenizer trained in memory, and tiny GSM8K files.

Nothing here touches the network or ../shared: a fresh clone runs these tests offline.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gsmtune.answers import answers_match, extract_strict
from gsmtune.runs import load_run

GLIBC = sys.platform.startswith("linux")  # where gsmtune.allocator can keep freed memory

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

PROBLEMS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = <<3+4=7>>7\n#### 7"),
    ("A box holds 12 eggs. How many eggs are in 5 boxes?", "12 * 5 = <<12*5=60>>60\n#### 60"),
    ("Sam had $1,200 and spent $450. How much is left?", "1200 - 450 = <<1200-450=750>>750\n#### 750"),
    ("A rope is 10 m long and is cut in 4 equal parts. How long is each part?", "10 / 4 = <<10/4=2.5>>2.5\n#### 2.5"),
    ("It was 5 degrees and fell by 8 degrees. What is the temperature now?", "5 - 8 = <<5-8=-3>>-3\n#### -3"),
    ("Ana reads 20 pages a day for 6 days. How many pages does she read?", "20 * 6 = <<20*6=120>>120\n#### 120"),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def gsm_dir(tmp_path: Path) -> Path:
    """A local GSM8K folder: train/test for main and socratic."""
    rows = [{"question": q, "answer": a} for q, a in PROBLEMS]
    for split in ("train", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
        write_jsonl(tmp_path / f"{split}_socratic.jsonl", [{"question": q, "answer": "Why? ** " + a} for q, a in PROBLEMS])
    return tmp_path


@pytest.fixture
def train_dir(tmp_path: Path) -> Path:
    """24 train problems (the six above, four times) and the six as test."""
    rows = [{"question": q, "answer": a} for q, a in PROBLEMS]
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", rows * 4)
    write_jsonl(data / "test.jsonl", rows)
    return data


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [q + "\n" + a for q, a in PROBLEMS] * 5 + ["Question: Answer: #### $ , . 0123456789 + - * / = < >"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=specials[4:])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _train_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 2-layer randomly initialised Gemma 3 text model saved as a model folder (seconds to build)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id, sliding_window=64,
    )
    model = Gemma3ForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-gemma")
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


# --- helpers shared by test modules (plain functions: `from conftest import ...`) ---------------------------------


def overrides(model_dir, data, out, *more):
    return [f"model.name={model_dir}", "dataset.source=local", f"dataset.path={data}", "training.max_steps=4",
            "training.per_device_train_batch_size=4", "training.gradient_accumulation_steps=1",
            "training.logging_steps=1", "training.save_steps=2", "training.learning_rate=1e-3",
            "generation.max_new_tokens=8", "model.dtype=fp32", f"output_dir={out}", *more]


def row(completion, gold="24", stop="answer_line", index=0, question="q"):
    strict = extract_strict(completion)
    return {"index": index, "question": question, "gold": gold, "completion": completion, "extracted_strict": strict,
            "correct": answers_match(strict, gold), "stop_reason": stop}


def write_run(path, rows, config="seed: 1\n"):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(config)
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    correct = sum(r["correct"] for r in rows)
    (path / "metrics.json").write_text(json.dumps({"correct": correct, "total": len(rows), "accuracy": correct / len(rows)}))
    return load_run(path)


def sliding_model(tokenizer, seed: int):
    """A tiny random Gemma 3 whose first layer has a 6-position sliding window (decodes soon outgrow it)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()


def oracle_drafts(prompts: list[list[int]], completions, calls: list[int]):
    """A `Lookup.draft` stand-in drafting each row's known continuation (`completions[row].token_ids`): a different
    length each call (1-5 tokens, cut at k), every third draft with its last token wrong; `calls` gets each length."""

    def draft(self, k: int) -> list[int]:
        row = next(i for i, p in enumerate(prompts) if self.tokens[:len(p)] == p)
        done = len(self.tokens) - len(prompts[row])
        tokens = completions[row].token_ids[done:done + k][: (len(calls) % 5) + 1]
        calls.append(len(tokens))
        return tokens[:-1] + [tokens[-1] + 1] if tokens and len(calls) % 3 == 0 else tokens

    return draft


def pytest_collection_modifyitems(config, items):
    """The `gpu` tier runs where CUDA is; elsewhere each of its tests shows as skipped, with the way to run it."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run benchmarks/gpu_check.sh on a GPU machine")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
