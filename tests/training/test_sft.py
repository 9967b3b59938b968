"""Fine-tuning on a tiny random model: loss masking, loss going down, kill + resume, fallbacks, adapters."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import GLIBC, PROBLEMS, overrides

from gsmtune.allocator import KEPT
from gsmtune.cli import CONFIGS, main
from gsmtune.config import load_config
from gsmtune.errors import GsmtuneError
from gsmtune.runs import stage_pieces


def make_trainer(cfg, tmp_path):
    from gsmtune.data import train_validation_split
    from gsmtune.training.common import choose_runtime
    from gsmtune.training.sft import build_trainer

    train, val = train_validation_split(cfg)
    optim, bf16 = choose_runtime(cfg.training, torch.device("cpu"))
    return build_trainer(cfg, tmp_path, train, val, torch.device("cpu"), optim, bf16)[0]


@pytest.mark.parametrize("chat", [False, True])
def test_loss_only_on_answer_and_eos(tiny_model_dir, train_dir, tmp_path, chat):
    cfg = load_config(None, overrides(tiny_model_dir, train_dir, tmp_path / "r", f"prompt.chat_template={chat}"))
    trainer = make_trainer(cfg, tmp_path)
    tok = trainer.processing_class
    answers = {a for _, a in PROBLEMS}
    for row in trainer.train_dataset:
        ids = row["input_ids"]
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        mask = [label != -100 for label in row["labels"]]
        trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
        prompt = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
        if chat:  # the end-of-turn token must carry loss, or the model never learns to stop
            assert trained.endswith("<end_of_turn>\n") or trained.endswith("<end_of_turn>")
            assert trained.split("<end_of_turn>")[0] in answers
            assert prompt.endswith("<start_of_turn>model\n")
        else:
            assert trained.endswith("<eos>") and trained[: -len("<eos>")].removeprefix(" ") in answers
            assert trained.startswith(" ")
            assert prompt.endswith("\nAnswer:") and prompt.startswith("<bos>Question: ")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_reduces_loss(tiny_model_dir, train_dir, tmp_path, method):
    out = tmp_path / method
    assert main(["train", "base", *overrides(tiny_model_dir, train_dir, out, f"training.method={method}",
                                                         "training.max_steps=12", "training.learning_rate=5e-3",
                                                         "training.lora.r=8", "training.lr_scheduler_type=constant")]) == 0
    m = json.loads((out / "train_metrics.json").read_text())
    losses = [p["loss"] for p in m["loss_curve"]]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05
    assert m["optimizer"] == "adamw_torch" and m["method"] == method and m["global_step"] == 12
    assert m["trainable_parameters"] > 0 and m["tokens_per_second"] > 0 and m["peak_memory_gib"] > 0
    files = {p.name for p in (out / "model").iterdir()}
    assert ("adapter_model.safetensors" if method == "lora" else "model.safetensors") in files
    data = json.loads((out / "training_data.json").read_text())  # the trained rows' questions and solutions
    assert data["questions"] == 24 and len(data["examples_sha256"]) == 64


@pytest.mark.parametrize("method", ["lora", "full"])
def test_default_head_trains_to_trls_losses(tiny_model_dir, train_dir, tmp_path, method):
    """The answer-only bf16 output layer (default on CPU) against TRL's own fused head: the same loss curve."""
    curves = {}
    for head in (True, False):
        out = tmp_path / f"head-{head}"
        assert main(["train", "base", *overrides(tiny_model_dir, train_dir, out, "training.max_steps=6",
                                                             f"training.answer_head={head}", "training.lora.dropout=0",
                                                             f"training.method={method}")]) == 0
        curves[head] = [p["loss"] for p in json.loads((out / "train_metrics.json").read_text())["loss_curve"]]
    assert curves[True] == pytest.approx(curves[False], rel=1e-2)
    assert curves[True][0] == pytest.approx(curves[False][0], rel=1e-3)  # same weights, same batch: same first loss


def test_answer_head_replaces_trls_only_where_trls_is_slow(tiny_model_dir, train_dir, tmp_path):
    from trl.trainer.utils import FusedCausalLMOutput

    from gsmtune.training.answer_head import needs_answer_head

    cfg = load_config(None, overrides(tiny_model_dir, train_dir, tmp_path / "r"))
    model = make_trainer(cfg, tmp_path).model
    assert needs_answer_head(torch.device("cpu"))
    assert model.get_base_model().forward.__func__.__code__.co_filename.endswith("answer_head.py")
    batch = torch.tensor([[2, 5, 6, 7, 8]])
    labels = torch.tensor([[-100, -100, 6, 7, 8]])
    out = model(input_ids=batch, labels=labels, fused_lm_head=True)
    assert isinstance(out, FusedCausalLMOutput) and out.label_mask.tolist() == [[False, True, True, True]]
    assert model(input_ids=batch).logits.shape[:2] == (1, 5)  # without fused_lm_head: the model's own forward


@pytest.mark.parametrize(("setting", "device", "ram", "expected"), [
    (None, "cpu", 24, False), (None, "cpu", 16, True), (None, "cuda", 64, True), (True, "cpu", 64, True),
    (False, "cuda", 8, False)])
def test_gradient_checkpointing_default(monkeypatch, setting, device, ram, expected):
    from gsmtune.training import common
    from gsmtune.training.common import checkpointing

    monkeypatch.setattr(common, "physical_memory_gib", lambda: ram)
    cfg = load_config(None, [f"training.gradient_checkpointing={'null' if setting is None else setting}"])
    assert checkpointing(cfg.training, torch.device(device)) is expected


def test_padding_free_rows_do_not_see_each_other(tiny_model_dir, train_dir, tmp_path):
    """Rows concatenated into one: each answer token's log-probability is the one its row gets alone, so attention
    keeps the rows apart (with transformers' packing detection off, they differ by up to 0.23 here)."""
    cfg = load_config(None, overrides(tiny_model_dir, train_dir, tmp_path / "r", "training.padding_free=true",
                                      "training.method=full"))  # float32 weights: exact up to summation order
    trainer = make_trainer(cfg, tmp_path)
    rows = [trainer.train_dataset[i] for i in range(4)]
    assert len({len(r["input_ids"]) for r in rows}) > 1
    packed = trainer.data_collator(rows)
    assert packed["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows)) and "attention_mask" not in packed

    def answer_log_probs(batch):
        out = trainer.model.eval()(**batch, fused_lm_head=True, use_cache=False)
        return out.log_probs[out.label_mask]

    with torch.no_grad():
        alone = torch.cat([answer_log_probs(trainer.data_collator([r])) for r in rows])
        torch.testing.assert_close(answer_log_probs(packed), alone, rtol=0, atol=1e-4)


def test_padding_free_trains_to_padded_losses(tiny_model_dir, train_dir, tmp_path):
    curves = {}
    for flat in (True, False):
        out = tmp_path / f"flat-{flat}"
        assert main(["train", "base", *overrides(tiny_model_dir, train_dir, out, f"training.padding_free={flat}",
                                                             "training.lora.dropout=0")]) == 0
        curves[flat] = [p["loss"] for p in json.loads((out / "train_metrics.json").read_text())["loss_curve"]]
    assert curves[True] == pytest.approx(curves[False], rel=1e-2)
    assert curves[True][0] == pytest.approx(curves[False][0], rel=1e-3)


@pytest.mark.parametrize(("settings", "device", "model_type", "expected"), [
    ([], "cpu", "gemma3_text", True), ([], "cuda", "gemma3_text", False), ([], "cpu", "opt", False),
    (["model.trust_remote_code=true"], "cpu", "llama", False), (["training.packing=true"], "cpu", "llama", False),
    (["training.neftune_noise_alpha=5"], "cpu", "gemma", False), (["training.padding_free=false"], "cpu", "gemma", False),
    (["training.padding_free=true"], "cuda", "opt", True)])
def test_padding_free_default(settings, device, model_type, expected):
    from gsmtune.training.sft import padding_free

    assert padding_free(load_config(None, settings), torch.device(device), model_type) is expected


def test_rows_cut_at_max_length(tiny_model_dir, train_dir, tmp_path):
    """Cut as TRL would (it leaves that to the caller when padding-free); a row left without answer tokens goes."""
    from gsmtune.data import train_validation_split
    from gsmtune.training.sft_data import sft_rows

    cfg = load_config(None, overrides(tiny_model_dir, train_dir, tmp_path / "r"))
    tokenizer = make_trainer(cfg, tmp_path).processing_class
    problems = train_validation_split(cfg)[0]
    full = sft_rows(problems, cfg, tokenizer)
    prompt = min(r["completion_mask"].index(1) for r in full)
    for mode in ("keep_start", "keep_end"):
        cut = load_config(None, overrides(tiny_model_dir, train_dir, tmp_path / "r", f"training.max_length={prompt + 2}",
                                          f"training.truncation_mode={mode}"))
        rows = sft_rows(problems, cut, tokenizer)
        assert rows and all(len(r["input_ids"]) == len(r["completion_mask"]) == prompt + 2 and any(r["completion_mask"])
                            for r in rows)
        kept = [r for r in full if r["completion_mask"].index(1) < prompt + 2] if mode == "keep_start" else full
        assert len(rows) == len(kept)  # keep_start drops rows whose prompt fills the cut; keep_end keeps answer ends
        assert mode == "keep_end" or 0 < len(kept) < len(full)
        ends = [f["input_ids"][:prompt + 2] if mode == "keep_start" else f["input_ids"][-prompt - 2:] for f in kept]
        assert [r["input_ids"] for r in rows] == ends


def test_fallback_lines(capsys):
    from gsmtune.training.common import choose_runtime

    cfg = load_config(None, ["training.optim=adamw_bnb_8bit"])
    optim, _ = choose_runtime(cfg.training, torch.device("cpu"))
    assert optim == "adamw_torch"
    assert "training.optim=adamw_bnb_8bit needs CUDA; using adamw_torch instead" in capsys.readouterr().err


def test_gpu_without_bitsandbytes_names_the_extra(monkeypatch, capsys):
    import importlib.util

    from gsmtune.training.common import choose_runtime

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    cfg = load_config(None, ["training.optim=adamw_bnb_8bit", "training.bf16=false"])
    assert choose_runtime(cfg.training, torch.device("cuda"))[0] == "adamw_torch"
    assert 'needs bitsandbytes (pip install -e ".[gpu]"); using adamw_torch instead' in capsys.readouterr().err


def test_fsdp2_gets_adamw_torch(monkeypatch, capsys):
    """bitsandbytes' 8-bit AdamW cannot update FSDP2's sharded parameters (failed on an H200 in benchmarks/gpu_check.sh)."""
    import importlib.util

    from gsmtune.training.common import choose_runtime

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    cfg = load_config(None, ["training.optim=adamw_bnb_8bit", "training.bf16=false"])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert choose_runtime(cfg.training, torch.device("cuda"))[0] == "adamw_bnb_8bit"
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert choose_runtime(cfg.training, torch.device("cuda"))[0] == "adamw_torch"
    assert "needs unsharded parameters (its kernels take no FSDP2 DTensor); using adamw_torch" in capsys.readouterr().err


def test_qlora_needs_cuda(tiny_model_dir, train_dir, tmp_path, capsys):
    assert main(["train", "base", *overrides(tiny_model_dir, train_dir, tmp_path / "q", "training.method=qlora")]) == 2
    assert "training.method=qlora needs CUDA" in capsys.readouterr().err


def test_validation_split_is_seeded_and_disjoint(train_dir):
    from gsmtune.data import train_validation_split

    cfg = load_config(None, ["dataset.source=local", f"dataset.path={train_dir}", "dataset.validation_size=4",
                             "dataset.train_samples=10"])
    train, val = train_validation_split(cfg)
    assert len(train) == 10 and len(val) == 4 and not {p.index for p in train} & {p.index for p in val}
    again = train_validation_split(cfg)
    assert [p.index for p in again[0]] == [p.index for p in train]
    too_many = load_config(None, ["dataset.source=local", f"dataset.path={train_dir}", "dataset.train_samples=30"])
    with pytest.raises(GsmtuneError, match="does not fit the 24 train problems"):
        train_validation_split(too_many)


def test_validation_and_early_stopping_run(tiny_model_dir, train_dir, tmp_path, monkeypatch):
    from gsmtune.training import memory_ceiling

    checks = []  # the memory ceiling looks after every optimizer step and every validation batch
    monkeypatch.setattr(memory_ceiling, "trim_above", lambda: checks.append(1) or False)
    out = tmp_path / "v"
    assert main(["train", "base", *overrides(tiny_model_dir, train_dir, out, "dataset.validation_size=4",
                                                         "training.eval_steps=2",
                                                         "training.early_stopping_patience=3")]) == 0
    m = json.loads((out / "train_metrics.json").read_text())
    assert m["validation_examples"] == 4 and [p["step"] for p in m["eval_loss_curve"]] == [2, 4]
    assert len(checks) > m["global_step"] and m["heap_trims"] == 0


def test_adapter_folder_evaluates_and_merges(tiny_model_dir, train_dir, tmp_path):
    out = tmp_path / "lora"
    assert main(["run", "base", *overrides(tiny_model_dir, train_dir, out, "training.merge=true")]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(PROBLEMS)
    merged = tmp_path / "merged2"
    assert main(["merge", str(out / "model"), "-o", str(merged)]) == 0
    for model_dir in (out / "model", out / "merged", merged):  # the adapter, the flag-merged and the CLI-merged model
        assert main(["eval", "base", *overrides(model_dir, train_dir, tmp_path / f"e-{model_dir.name}")]) == 0
    completions = [[json.loads(line)["completion"] for line in (tmp_path / f"e-{d}" / "predictions.jsonl").read_text().splitlines()]
                   for d in ("model", "merged", "merged2")]
    assert completions[0] == completions[1] == completions[2]


@pytest.mark.slow
def test_sigkill_mid_training_then_resume(tiny_model_dir, train_dir, tmp_path):
    """Killed after its first checkpoint, resumed: same final step and the same losses as an uninterrupted run."""
    steps = 30  # long enough that the kill lands mid-run even on a fast machine

    def cmd(out):
        return [sys.executable, "-m", "gsmtune.cli", "train", "base",
                *overrides(tiny_model_dir, train_dir, out, f"training.max_steps={steps}", "training.method=full")]

    ref = tmp_path / "ref"
    subprocess.run(cmd(ref), check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("checkpoint-*/trainer_state.json")):
        assert time.time() < deadline and proc.poll() is None, "no checkpoint before the run ended"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "train_metrics.json").exists()
    for state_file in (out / "checkpoints").glob("checkpoint-*/trainer_state.json"):  # as if the killed piece ran an hour
        state = json.loads(state_file.read_text())
        state["stateful_callbacks"]["TrainClock"]["args"]["seconds"] = 3600.0
        state_file.write_text(json.dumps(state))
    prov = json.loads((out / "provenance.json").read_text())
    here = prov["train"]["dtype"]
    prov["train"]["dtype"] = other = {"bfloat16": "float32", "float32": "bfloat16"}[here]  # as if on another CPU
    (out / "provenance.json").write_text(json.dumps(prov))
    resumed = subprocess.run(cmd(out) + ["--resume"], check=True, capture_output=True, text=True)
    assert f"trained in {other} until its checkpoint and goes on in {here}" in resumed.stderr
    first, last = stage_pieces(out, "train")  # each piece's record is kept; a run in one piece has one
    assert (first["dtype"], last["dtype"]) == (other, here) and len(stage_pieces(ref, "train")) == 1
    assert "Trained in 2 pieces, resumed from checkpoints" in (out / "model" / "README.md").read_text()
    m, r = (json.loads((d / "train_metrics.json").read_text()) for d in (out, ref))
    assert m["global_step"] == r["global_step"] == steps and m["resumed_from"]
    assert m["train_runtime_seconds"] >= 3600 + m["last_piece_runtime_seconds"] / 2  # the killed piece's hour counts
    assert m["train_runtime_seconds"] < 3600 + 3 * m["last_piece_runtime_seconds"] + 5  # and counts once
    assert m["train_loss_mean"] == pytest.approx(r["train_loss_mean"], rel=1e-3)  # over both pieces, not the last
    assert (m["allocator"] == r["allocator"] == KEPT) is GLIBC  # in the `gsmtune` process that trained
    assert m["heap_trims"] == 0  # the memory ceiling watched every step; a tiny model never reaches it
    resumed_steps = {p["step"]: p["loss"] for p in m["loss_curve"]}
    assert max(resumed_steps) == steps
    for p in r["loss_curve"]:
        if p["step"] in resumed_steps:
            assert resumed_steps[p["step"]] == pytest.approx(p["loss"], rel=1e-4)


@pytest.mark.slow
def test_two_process_accelerate_launch(tiny_model_dir, train_dir, tmp_path):
    """DDP over gloo on two CPU processes: trains, saves once, and each optimizer step sees both processes' batches."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "accelerate" / "cpu_2proc.yaml"),
           "--main_process_port", "29533", "-m", "gsmtune.cli", "train", "base",
           *overrides(tiny_model_dir, train_dir, out, "training.max_steps=3", "training.bf16=false")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "train_metrics.json").read_text())
    assert m["global_step"] == 3 and m["examples_seen"] == 3 * 4 * 2
    assert (m["allocator"] == KEPT) is GLIBC  # in rank 0 of accelerate launch
    assert (out / "model" / "adapter_model.safetensors").exists()


def test_adapter_names_its_base_portably(tiny_model_dir, train_dir, tmp_path, monkeypatch):
    """A base folder is recorded relative to the adapter: it loads from any working directory, and after the base and
    the run folder move together (a clone elsewhere)."""
    import shutil

    from gsmtune.models import load_model

    shutil.copytree(tiny_model_dir, tmp_path / "tree" / "weights")
    monkeypatch.chdir(tmp_path / "tree")
    out = tmp_path / "tree" / "runs" / "lora"
    assert main(["train", "base", *overrides("weights", train_dir, out, "training.max_steps=1")]) == 0
    config = json.loads((out / "model" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.join("..", "..", "..", "weights")
    monkeypatch.chdir(tmp_path)
    assert load_model(str(out / "model"), dtype="fp32").model.peft_config["default"].r == 16
    shutil.move(tmp_path / "tree", tmp_path / "moved")
    assert load_model(str(tmp_path / "moved" / "runs" / "lora" / "model"), dtype="fp32").path.endswith("model")


def test_tracker_without_its_package_is_one_line(monkeypatch, capsys):
    import importlib.util

    from gsmtune.training.common import choose_runtime

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(GsmtuneError, match="training.report_to=wandb needs its package: pip install wandb"):
        choose_runtime(load_config(None, ["training.report_to=wandb"]).training, torch.device("cpu"))


def test_tensorboard_tracking_writes_events(tiny_model_dir, train_dir, tmp_path):
    out = tmp_path / "tb"
    assert main(["train", "base", *overrides(tiny_model_dir, train_dir, out, "training.max_steps=2",
                                                         "training.report_to=tensorboard")]) == 0
    assert list(out.rglob("events.out.tfevents.*"))


@pytest.mark.parametrize(("model_type", "extra", "expected"), [
    ("gemma2", {"attn_logit_softcapping": 50.0}, "eager"),  # soft-capped attention logits: sdpa cannot
    ("gemma3_text", {"attn_logit_softcapping": None}, None),  # library default (sdpa)
    ("llama", {}, None),
])
def test_training_attention(tmp_path, model_type, extra, expected):
    from transformers import AutoConfig

    from gsmtune.training.common import training_attention

    AutoConfig.for_model(model_type, **extra).save_pretrained(tmp_path)
    assert training_attention(load_config(None, []), str(tmp_path)) == expected
    assert training_attention(load_config(None, ["model.attn_implementation=eager"]), str(tmp_path)) == "eager"


def test_trl_fields_reach_the_trainer(tiny_model_dir, train_dir, tmp_path):
    """training.NAME for a field gsmtune does not own goes to SFTConfig as given, after gsmtune's own arguments."""
    cfg = load_config(None, overrides(tiny_model_dir, train_dir, tmp_path / "r", "training.neftune_noise_alpha=5",
                                      "training.dataloader_num_workers=1"))
    args = make_trainer(cfg, tmp_path).args
    assert (args.neftune_noise_alpha, args.dataloader_num_workers) == (5, 1)
