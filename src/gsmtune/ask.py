"""`gsmtune ask`: a question of your own to a base model, a trained run or an adapter, answered as evaluation would.

The model is loaded and prompted the way `gsmtune eval` does it (the run folder's own prompt settings when there is
one), decoded by the same loop, and the answer extracted by the same code; the completion streams line by line.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from omegaconf import DictConfig

from gsmtune.errors import GsmtuneError
from gsmtune.runs import CONFIG, MERGED, MODEL


def run_folder_of(model: str) -> Path | None:
    """The run folder a model path belongs to: RUN itself, or RUN/model, RUN/merged; None for anything else."""
    path = Path(model).expanduser()
    if (path / CONFIG).is_file() and (path / MODEL).is_dir():
        return path
    if path.name in (MODEL, MERGED) and (path.parent / CONFIG).is_file():
        return path.parent
    return None


def ask_config(model: str, overrides: list[str]) -> DictConfig:
    """The config to ask with: the run's own when `model` is in a run folder, its model.name the weights to load."""
    from gsmtune.config import load_config

    run = run_folder_of(model)
    weights = str(run / MODEL) if run is not None and Path(model).expanduser() == run else model
    return load_config(run / CONFIG if run is not None else None, [f"model.name={weights}", *overrides])


def questions_from(args: list[str], stdin: TextIO) -> list[str]:
    """The questions given, `-` reading one per line from stdin; an empty question is an error."""
    questions: list[str] = []
    for q in args:
        questions += [line.strip() for line in stdin if line.strip()] if q == "-" else [q.strip()]
    if not questions or not all(questions):
        raise GsmtuneError("empty question: give the question as an argument in quotes, or '-' to read them from stdin")
    return questions


class LineStream:
    """Prints a row's text a full line at a time: a stop rule can still cut the line being written."""

    def __init__(self, out: TextIO):
        self.out, self.shown = out, 0

    def __call__(self, row: int, text: str) -> None:
        end = text.rfind("\n") + 1
        if end > self.shown:
            self.out.write(text[self.shown:end])
            self.out.flush()
            self.shown = end

    def finish(self, text: str) -> None:
        """The rest of the completion as cut; nothing when the cut fell inside the line break already shown."""
        if len(text) >= self.shown:
            self.out.write(text[self.shown:] + "\n")
        self.shown = 0


def ask(cfg: DictConfig, questions: Iterable[str], out: TextIO | None = None) -> list[str | None]:
    """Answer each question: the completion streamed, then `answer: N` (and the samples' votes with num_samples > 1)."""
    out = out or sys.stdout  # looked up per call: tests and callers may have replaced it
    from omegaconf import OmegaConf

    from gsmtune.answers import extract_flexible, extract_strict
    from gsmtune.data import load_split
    from gsmtune.evaluate import majority_vote, sample_completions
    from gsmtune.generation import StopRules, stream
    from gsmtune.models import load_model
    from gsmtune.prompts import build_prompt, shots_for, tokenize_prompt

    lm = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code,
                    cfg.model.attn_implementation)
    shots = shots_for(cfg.prompt, load_split(cfg.dataset, "train") if cfg.prompt.strategy == "few_shot" else None)
    rules = StopRules(cfg.generation.stop_at_answer, cfg.generation.stop_at_new_question)
    greedy_cfg = OmegaConf.merge(cfg.generation, {"do_sample": False})
    answers = []
    for number, question in enumerate(questions):
        ids = tokenize_prompt(build_prompt(question, cfg, shots, lm.tokenizer), lm.tokenizer)
        shown = LineStream(out)
        [(_, completion)] = list(stream(lm.model, lm.tokenizer, [ids], greedy_cfg, rules, on_text=shown))
        shown.finish(completion.text)
        answer = extract_strict(completion.text)
        note = "" if answer is not None else " (no '####' line: the last number written)"
        answer = answer if answer is not None else extract_flexible(completion.text)
        if cfg.generation.num_samples > 1:
            [samples] = sample_completions(lm, [ids], cfg, rules, [number])
            votes = [extract_strict(s.text) for s in samples]
            answer, note = majority_vote(votes), f" (majority of {len(votes)} samples: {', '.join(map(str, votes))})"
        out.write(f"answer: {answer}{note}\n")
        answers.append(answer)
    return answers
