"""GSM8K problems from the Hub, from local files, or generated offline (GSM-Symbolic), and the seeded eval subset."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from gsmtune.answers import extract_strict
from gsmtune.errors import GsmtuneError


@dataclass(frozen=True)
class Problem:
    index: int  # position in its split: the id that ties predictions of different runs together
    question: str
    answer: str  # the full gold solution, ending in '#### <number>'


def load_split(ds: DictConfig, split: str) -> list[Problem]:
    """All problems of one split ('train' or 'test') from the configured source."""
    if ds.source == "hub":
        rows = _hub_rows(ds.name, ds.config_name, split)
        where = f"{ds.name}[{ds.config_name}]/{split}"
    elif ds.source == "local":
        return _local_problems(Path(ds.path), ds.config_name, split)
    else:
        rows = symbolic_rows(split, ds.symbolic_train_size, ds.symbolic_test_size, ds.symbolic_test_fraction)
        where = f"gsm_symbolic/{split}"
    return [_problem(i, row, where, i + 1) for i, row in enumerate(rows)]


def _hub_rows(name: str, config_name: str, split: str) -> list[dict]:
    import datasets

    try:
        return list(datasets.load_dataset(name, config_name, split=split))
    except Exception as e:  # network, auth and missing-dataset errors have many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise GsmtuneError(
            f"could not load {name} ({config_name}, {split}) from the Hugging Face Hub: {first}; "
            "offline? use dataset.source=local dataset.path=FOLDER or dataset.source=symbolic"
        ) from e


def local_file(folder: Path, config_name: str, split: str) -> Path:
    """`test.jsonl` for main, `test_socratic.jsonl` for socratic; parquet accepted too."""
    if not folder.is_dir():
        raise GsmtuneError(f"dataset.path={folder} is not a folder; point it at a folder holding {split}.jsonl")
    stem = split if config_name == "main" else f"{split}_{config_name}"
    for ext in (".jsonl", ".parquet"):
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    raise GsmtuneError(f"no {stem}.jsonl or {stem}.parquet in {folder}: add it or change dataset.config_name")


def _local_problems(folder: Path, config_name: str, split: str) -> list[Problem]:
    path = local_file(folder, config_name, split)
    if path.suffix == ".parquet":
        import pandas as pd

        return [_problem(i, row, str(path), i + 1) for i, row in enumerate(pd.read_parquet(path).to_dict("records"))]
    problems = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise GsmtuneError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from e
            problems.append(_problem(len(problems), row, str(path), lineno))
    if not problems:
        raise GsmtuneError(f"{path} holds no problems")
    return problems


def _problem(index: int, row: object, where: str, lineno: int) -> Problem:
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
        raise GsmtuneError(f"{where}:{lineno}: a row needs string fields 'question' and 'answer'")
    if extract_strict(row["answer"]) is None:
        raise GsmtuneError(f"{where}:{lineno}: 'answer' has no final '#### <number>' line")
    return Problem(index=index, question=row["question"], answer=row["answer"])


def symbolic_templates(test_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """GSM-Symbolic template ids split into (train, test): no test template is ever trained on."""
    from random import Random

    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok

    templates = sorted(tasks_ok)
    Random(seed).shuffle(templates)
    n_test = max(1, round(len(templates) * test_fraction))
    return templates[n_test:], templates[:n_test]


def symbolic_rows(split: str, train_size: int, test_size: int, test_fraction: float, seed: int = 0) -> list[dict]:
    """GSM-Symbolic problems generated offline by reasoning-gym, each split from its own templates."""
    from random import Random

    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import GSMSymbolicDataset, GSMSymbolicDatasetConfig

    if split not in ("train", "test"):
        raise GsmtuneError(f"dataset.source=symbolic has splits train and test, not '{split}'")
    generators = GSMSymbolicDataset(GSMSymbolicDatasetConfig(seed=seed, size=1)).generators
    train_ids, test_ids = symbolic_templates(test_fraction, seed)
    mine, size = (test_ids, test_size) if split == "test" else (train_ids, train_size)
    offset = 0 if split == "test" else 1_000_000  # separate random streams per split
    rows = []
    for i in range(size):
        ex = generators[mine[i % len(mine)]](Random(seed + offset + i), 1.0)
        rows.append({"question": ex["question"], "answer": ex["metadata"]["answer_cot"]})
    return rows


def train_validation_split(cfg: DictConfig) -> tuple[list[Problem], list[Problem]]:
    """A seeded shuffle of train: the first `validation_size` for validation, the next `train_samples` for training."""
    problems = load_split(cfg.dataset, "train")
    order = list(range(len(problems)))
    random.Random(cfg.seed).shuffle(order)
    n_val = cfg.dataset.validation_size
    n_train = cfg.dataset.train_samples if cfg.dataset.train_samples is not None else len(problems) - n_val
    if n_val < 0 or n_train <= 0 or n_val + n_train > len(problems):
        raise GsmtuneError(
            f"dataset.train_samples={cfg.dataset.train_samples} + dataset.validation_size={n_val} does not fit the "
            f"{len(problems)} train problems; lower them"
        )
    val = [problems[i] for i in order[:n_val]]
    train = [problems[i] for i in order[n_val: n_val + n_train]]
    return train, val


def load_eval_problems(cfg: DictConfig) -> list[Problem]:
    """The problems a run is scored on: a seeded subset of the eval split, or the validation split carved from train."""
    if cfg.dataset.eval_split == "validation":
        if cfg.dataset.validation_size <= 0:
            raise GsmtuneError("dataset.eval_split=validation needs dataset.validation_size > 0")
        problems = train_validation_split(cfg)[1]
    else:
        problems = load_split(cfg.dataset, cfg.dataset.eval_split)
    return eval_subset(problems, cfg.num_eval_samples, cfg.seed)


def eval_subset(problems: list[Problem], n: int | None, seed: int) -> list[Problem]:
    """`n` problems drawn with `seed` (the same set on every run with that seed), in split order."""
    if n is None:
        return list(problems)
    if n > len(problems):
        raise GsmtuneError(f"num_eval_samples={n} is larger than the split ({len(problems)} problems); lower it or use null")
    picked = sorted(random.Random(seed).sample(range(len(problems)), n))
    return [problems[i] for i in picked]
