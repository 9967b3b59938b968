"""The run folder, the one contract between stages: its files, create / resume / refuse, reading it back, provenance.

    RUN/config.yaml          the resolved config, written first (a resume must match it)
    RUN/provenance.json      per stage (train, eval): which code, libraries, device and dtype ran it (a resumed stage
                             keeps each earlier process's record); an evaluation of a trained model also names the
                             training that made it
    RUN/predictions.jsonl    one scored problem per line, appended as problems finish (an interrupted eval resumes)
    RUN/metrics.json         written last by evaluation
    RUN/train_metrics.json   written last by training
    RUN/training_data.json   a hash of every training question, exact and number-normalised (contamination checks),
                             and one digest of the (question, solution) set
    RUN/model/               the trained weights: a LoRA adapter or a full model folder
    RUN/merged/              the adapter folded into its base (training.merge=true)
    RUN/checkpoints/         the trainer's checkpoints (`--resume`)

Analysis reads a run folder alone: no model, no dataset, no other folder.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gsmtune.config import config_differences, to_yaml, upgrade_keys
from gsmtune.errors import GsmtuneError
from gsmtune.gsm8k_format import normalize_question

CONFIG = "config.yaml"
PROVENANCE = "provenance.json"
PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
TRAIN_METRICS = "train_metrics.json"
TRAINING_DATA = "training_data.json"
MODEL = "model"
MERGED = "merged"
CHECKPOINTS = "checkpoints"

FORMAT = 2  # 1: folders from before provenance.json (read through `_upgrade`)
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")


def prepare(cfg: DictConfig, resume: bool, overwrite: bool, finished: bool = False) -> Path:
    """Create the run folder, refusing to mix this run with an earlier one that used another config, and save this
    config in it, unless it is `finished` and resumed: a resume then leaves it as it is."""
    out = Path(cfg.output_dir)
    saved = out / CONFIG
    if saved.exists():
        if overwrite:
            shutil.rmtree(out)
        else:
            if not resume:
                raise GsmtuneError(f"{out} already holds a run: pass --resume to continue it or --overwrite to replace it")
            diff = config_differences(OmegaConf.create(upgrade_keys(OmegaConf.to_container(OmegaConf.load(saved)))), cfg)
            if diff:
                raise GsmtuneError(
                    f"{out} holds a run with a different config ({', '.join(diff[:5])}); "
                    "use another output_dir or --overwrite"
                )
    out.mkdir(parents=True, exist_ok=True)
    loaded_commit()  # pinned now: provenance is written when a stage ends, hours later
    if not (finished and resume and saved.exists()):
        write_atomic(saved, to_yaml(cfg))
    return out


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename, so a run killed mid-write leaves the old file whole, never a torn one
    that every later `--resume` would trip over."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- provenance --------------------------------------------------------------------------------------------------


PACKAGE_DIR = Path(__file__).resolve().parent
CODE_PATHS = (":(top)src", ":(top)scripts", ":(top)benchmarks", ":(top)pyproject.toml", ":(top)constraints.txt")


def git_commit(here: Path = PACKAGE_DIR) -> str | None:
    """The commit of the gsmtune checkout in use, '+dirty' when its code, configs, scripts or pins have changes (not
    results or docs, which a study itself rewrites); None outside a git checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--",
                                *CODE_PATHS], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


@functools.cache
def loaded_commit() -> str | None:
    """git_commit() when this process first prepared a run folder, before hours of work: its code is the checkout as
    it was then, and a checkout that moves on during a day-long run (the study commits as it goes) must not relabel
    what an earlier commit's code made."""
    return git_commit()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def provenance(device: str, dtype: str) -> dict:
    """What made a run: enough to re-run it with the same code and libraries, and to tell runs apart."""
    return {"gsmtune": _version("gsmtune"), "git_commit": loaded_commit(),
            "python": platform.python_version(), **{lib: _version(lib) for lib in LIBRARIES},
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu": cpu_name(), "device": device, "dtype": dtype, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def cpu_name() -> str:
    """The CPU model and whether it runs bf16 natively: a re-check on another CPU can differ in speed, and a row
    trained there can differ in precision (gsmtune trains in float32 where bf16 would be emulated)."""
    import torch

    from gsmtune.models import bf16_supported

    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # Linux: the first CPU's model name, family and model number
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first if ":" in line)}
        if "model name" in fields:
            name = f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
    return f"{name}; bf16 {'native' if bf16_supported(torch.device('cpu')) else 'not native'}"


def write_provenance(out: Path, stage: str, device: str, dtype: str, model_path: str | None = None,
                     continues: bool = False) -> None:
    """Record this stage's (train or eval) provenance, and which gsmtune training made the model it started from. An
    evaluation also copies that training's question hashes, so the folder answers "which method" and "which training
    questions" by itself. A process that `continues` a stage (from a checkpoint or predictions) keeps the records of
    the processes before it: a row made in pieces may have run on other code, CPUs or precisions."""
    record = provenance(device, dtype)
    trained = trained_by(model_path)
    if trained is not None:
        run, train_metrics = trained
        record["trained_model"] = {"run": str(run), "method": train_metrics["method"], "model": train_metrics["model"]}
        if stage == "eval" and (run / TRAINING_DATA).exists() and run.resolve() != out.resolve():
            shutil.copyfile(run / TRAINING_DATA, out / TRAINING_DATA)
    stages = _read_json(out / PROVENANCE) or {}
    if continues and stage in stages:
        earlier = dict(stages[stage])
        record["earlier"] = earlier.pop("earlier", []) + [earlier]
    write_atomic(out / PROVENANCE, json.dumps(stages | {"format": FORMAT, stage: record}, indent=2) + "\n")


def pieces(record: dict | None) -> list[dict]:
    """Every process's record in one stage's provenance, the first first: one unless the stage was resumed."""
    record = dict(record or {})
    return [*record.pop("earlier", []), record] if record else []


def stage_pieces(out: Path, stage: str) -> list[dict]:
    return pieces((_read_json(out / PROVENANCE) or {}).get(stage))


def trained_by(model_path: str | None) -> tuple[Path, dict] | None:
    """The run folder and training metrics of a model gsmtune trained (RUN/model or RUN/merged); else None."""
    if not model_path:
        return None
    run = Path(model_path).expanduser().parent
    train_metrics = _read_json(run / TRAIN_METRICS)
    return (run, train_metrics) if train_metrics is not None else None


# --- training data fingerprint -----------------------------------------------------------------------------------


def question_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def fingerprint(questions: list[str], solutions: list[str] | None = None) -> dict:
    """Hashes of each question, exact (stripped) and number-normalised; sorted, so the file says nothing of order.
    With the solutions, one digest of the (question, solution) set too: main and socratic share their questions.
    The digest covers this run's own examples (a GRPO run's SFT start keeps its own in its folder)."""
    record = {"questions": len(questions), "hash": "sha256[:16]",
              "exact": sorted({question_hash(q.strip()) for q in questions}),
              "normalized": sorted({question_hash(normalize_question(q)) for q in questions})}
    if solutions is not None:
        pairs = sorted(question_hash(f"{q}\n{a}") for q, a in zip(questions, solutions, strict=True))
        record["examples_sha256"] = hashlib.sha256("".join(pairs).encode()).hexdigest()
    return record


def write_training_data(out: Path, questions: list[str], model_path: str | None = None,
                        solutions: list[str] | None = None) -> None:
    """The hashes of this run's training questions, plus those of the gsmtune training its model started from (GRPO
    on an SFT adapter saw both sets)."""
    record = fingerprint(questions, solutions)
    trained = trained_by(model_path)
    earlier = _read_json(trained[0] / TRAINING_DATA) if trained is not None else None
    if earlier:
        record |= {"questions": record["questions"] + earlier["questions"], "includes": str(trained[0]),
                   **{k: sorted(set(record[k]) | set(earlier[k])) for k in ("exact", "normalized")}}
    write_atomic(out / TRAINING_DATA, json.dumps(record) + "\n")


def training_speed(train_metrics: dict) -> float | None:
    """Tokens/s over all resumed pieces (tokens seen / seconds trained); `tokens_per_second` in train_metrics.json is
    the last piece's, which is what a resumed piece measures but not what the whole training cost. None where a piece
    ran before gsmtune kept the clock (no total seconds)."""
    tokens, seconds = train_metrics.get("tokens_seen"), train_metrics.get("train_runtime_seconds")
    return tokens / seconds if tokens and seconds else None


# --- reading a run back ------------------------------------------------------------------------------------------


def read_predictions(path: Path, repair: bool = False) -> dict[int, dict]:
    """Predictions by problem index, skipping a torn line (a run killed mid-write); `repair` also rewrites the file
    without it, so a resumed evaluation redoes that problem."""
    done: dict[int, dict] = {}
    if not path.exists():
        return done
    text = path.read_text(encoding="utf-8")
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[row["index"]] = row
    clean = "".join(json.dumps(r) + "\n" for r in done.values())
    if repair and clean != text:
        write_atomic(path, clean)
    return done


@dataclass
class Run:
    path: Path
    name: str
    config: dict
    metrics: dict
    predictions: dict[int, dict]
    provenance: dict
    train_metrics: dict | None = None
    training_data: dict | None = None

    @property
    def trained_method(self) -> str | None:
        """The training method behind the answers: this run's own, or that of the model folder it evaluated."""
        if self.train_metrics:
            return self.train_metrics["method"]
        return self.provenance.get("eval", {}).get("trained_model", {}).get("method")

    @property
    def method(self) -> str:
        """What produced the answers: the training, the prompt for in-context or re-evaluated runs, the calculator,
        and the dtype decoding ran in (it moves bf16 results)."""
        trained = self.trained_method
        text = ("GRPO" if trained == "grpo" else f"{trained} SFT") if trained else ""
        if not self.train_metrics:
            p = self.config.get("prompt", {})
            prompt = p.get("strategy", "?").replace("_", "-") + (" + instruction" if p.get("instruction") else "")
            text = f"{text}, {prompt}" if text else prompt
        text += " + calculator" if self.config.get("generation", {}).get("calculator") else ""
        text += "".join(f", {k.rsplit('.', 1)[-1]} {v}" for k, v in self.swept.items())
        dtype = self.provenance.get("eval", {}).get("dtype")
        return text + (f" [{dtype}]" if dtype else "")

    @property
    def swept(self) -> dict:
        """A sweep trial's values of the keys its sweep searched (its folder name is a hash of them)."""
        if not self.path.name.startswith("trial-"):
            return {}
        values = {}
        for dim in (self.config.get("sweep") or {}).get("space") or []:
            node = self.config
            for part in dim["key"].split("."):
                node = node.get(part) if isinstance(node, dict) else None
            values[dim["key"]] = node
        return values

    @property
    def split(self) -> str:
        """The split scored: test, or validation for a sweep's trials (older runs did not record it: test)."""
        return str(self.metrics.get("dataset", "")).rsplit("/", 1)[-1] or "test"

    @property
    def dataset(self) -> str:
        """Variant, source, and the split scored where it is not test."""
        d = self.config.get("dataset", {})
        return f"{d.get('config_name', '?')} ({d.get('source', '?')}{'' if self.split == 'test' else ', ' + self.split})"


def _upgrade(run: Run) -> Run:
    """Folders from before FORMAT 2 (no provenance.json): the dtype from metrics or config, the training from a
    train_metrics.json beside the model folder it evaluated. The one place older layouts are read."""
    if run.provenance.get("format", 1) >= FORMAT:
        return run
    configured = run.config.get("model", {}).get("dtype", "auto")
    dtype = run.metrics.get("dtype") or (configured if configured != "auto" else None)
    run.provenance = {"format": 1, "eval": {"dtype": dtype}}
    trained = trained_by(run.metrics.get("model_path")) if not run.train_metrics else None
    if trained is not None:
        run.provenance["eval"]["trained_model"] = {"run": str(trained[0]), "method": trained[1]["method"]}
    return run


def load_run(path: str | Path, name: str | None = None) -> Run:
    path = Path(path)
    if not (path / METRICS).exists() or not (path / PREDICTIONS).exists():
        raise GsmtuneError(f"{path} is not a finished evaluation run (no {METRICS} / {PREDICTIONS})")
    config = OmegaConf.to_container(OmegaConf.load(path / CONFIG)) if (path / CONFIG).exists() else {}
    return _upgrade(Run(path=path, name=name or path.name, config=config, metrics=json.loads((path / METRICS).read_text()),
                        predictions=read_predictions(path / PREDICTIONS), provenance=_read_json(path / PROVENANCE) or {},
                        train_metrics=_read_json(path / TRAIN_METRICS), training_data=_read_json(path / TRAINING_DATA)))


def find_runs_in(folders: list[str | Path]) -> list[Run]:
    """The runs under several folders, each once; where two folders hold runs of the same name, every run is named by
    its path below the folders' common parent instead (a table or baseline pairing by name stays unambiguous)."""
    runs = list({r.path.resolve(): r for folder in folders for r in find_runs(folder)}.values())
    if len({r.name for r in runs}) < len(runs):
        top = Path(os.path.commonpath([r.path.resolve() for r in runs]))
        runs = [replace(r, name=str(r.path.resolve().relative_to(top))) for r in runs]
    return runs


def find_runs(root: str | Path) -> list[Run]:
    """Every finished evaluation run under `root` (the folder itself included), named by its relative path."""
    root = Path(root)
    found = sorted(p.parent for p in root.rglob(METRICS) if (p.parent / PREDICTIONS).exists())
    if not found:
        raise GsmtuneError(f"no runs (folders with {METRICS} and {PREDICTIONS}) under {root}")
    return [load_run(p, str(p.relative_to(root)) if p != root else p.name) for p in found]
