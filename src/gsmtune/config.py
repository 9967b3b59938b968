"""Typed run configuration: a schema, YAML files that may extend a base, and `key=value` overrides.

A run folder's `config.yaml` is the fully resolved config, so any run can be repeated from it.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gsmtune.errors import GsmtuneError

REFERENCE_INSTRUCTION = (
    "You are a helpful math assistant. Please provide a step-by-step derivation and end your answer "
    "with the final numerical result in the format '#### <number>'."
)


@dataclass
class ModelConfig:
    name: str = "bundled:gemma-3-270m"
    dtype: str = "auto"  # auto = bf16 where the hardware supports it, else fp32
    device: str = "auto"  # auto = cuda when present, else cpu
    trust_remote_code: bool = False
    attn_implementation: str | None = None


@dataclass
class DatasetConfig:
    name: str = "openai/gsm8k"
    config_name: str = "main"  # main | socratic
    source: str = "hub"  # hub | local | symbolic
    path: str | None = None  # folder of jsonl/parquet files when source=local
    prompt_format: str = "Question: {question}\nAnswer:"
    eval_split: str = "test"
    symbolic_train_size: int = 2000
    symbolic_test_size: int = 500
    symbolic_test_fraction: float = 0.2  # share of templates held out for test
    train_samples: int | None = None  # train on a seeded slice of train (None = all)
    validation_size: int = 0  # carve a seeded validation split out of train (never test)


@dataclass
class PromptConfig:
    strategy: str = "zero_shot"  # zero_shot | one_shot | few_shot
    one_shot_example: str = "study"  # study: the reference study's worked answer | gsm8k: GSM8K's annotated gold text
    num_shots: int = 5  # few_shot: the first num_shots problems of the train split
    instruction: bool = False
    instruction_text: str = REFERENCE_INSTRUCTION
    chat_template: bool = False


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    batch_size: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    stop_at_answer: bool = True  # stop after the line holding '#### <number>'
    stop_at_new_question: bool = True  # stop when the model starts a new 'Question:'
    calculator: bool = False  # force computed results into '<<expression=' annotations
    num_samples: int = 1  # > 1: self-consistency, k sampled completions per problem beside the greedy one
    draft_tokens: int | None = None  # greedy tail steps check this many looked-up tokens; None: 8 in bf16, 0 in fp32
    batch_invariant: bool = False  # each row's bits independent of the batch (tiled products, batch-invariant attention)


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class GRPOSettings:
    num_generations: int = 4  # completions per prompt; per_device_train_batch_size must be a multiple
    max_completion_length: int = 256
    temperature: float = 1.0
    beta: float = 0.0  # KL penalty to the starting model
    correct_weight: float = 1.0  # reward for the right final number
    format_weight: float = 0.2  # reward for a '#### <number>' line
    use_lora: bool = True  # train a new LoRA adapter (an adapter given as model.name keeps training either way)
    rollout: str = "decode_loop"  # CPU sampling through gsmtune's decode loop (training/rollout.py); "trl": generate()


@dataclass
class TrainingConfig:
    """Hugging Face `TrainingArguments` names; defaults are the reference study's."""

    method: str = "lora"  # full | lora | qlora | grpo
    learning_rate: float = 1e-5
    lr_scheduler_type: str = "cosine_with_min_lr"
    # cosine_with_min_lr's floor: {min_lr: 1.0e-6} or {min_lr_rate: 0.1}; unset, 0.1 (the study's 1e-6 under 1e-5)
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    warmup_steps: float = 0.0  # transformers 5: below 1, a share of the steps (formerly warmup_ratio)
    weight_decay: float = 0.0
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 2
    optim: str = "adamw_bnb_8bit"  # falls back to adamw_torch without CUDA
    bf16: bool = True  # falls back to fp32 where the hardware has no bf16
    gradient_checkpointing: bool | None = None  # None: off on CPUs with >= 20 GiB RAM (faster; BENCHMARKS.md), else on
    answer_head: bool = True  # output layer on answer tokens only, in bf16 (softmax fp32), where TRL's own head cannot
    padding_free: bool | None = None  # None: on for CPU SFT (a micro-batch's rows in one row, no padding; BENCHMARKS.md)
    max_length: int = 512  # tokens per training row (TRL's SFTConfig name; formerly max_seq_length)
    logging_steps: int = 10
    save_steps: int = 100
    save_total_limit: int = 2
    eval_steps: int = 50  # with dataset.validation_size > 0
    early_stopping_patience: int | None = None
    report_to: str = "none"  # none | tensorboard | wandb | mlflow
    merge: bool = False  # LoRA: also write a merged full model to RUN/merged
    lora: LoraConfig = field(default_factory=LoraConfig)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)


@dataclass
class SweepConfig:
    """`gsmtune sweep`: entries like {key: training.learning_rate, type: float, low: 1.0e-5, high: 1.0e-3, log: true}."""

    space: list[Any] = field(default_factory=list)
    study_name: str = "gsmtune"
    sampler: str = "tpe"  # tpe | grid: every combination of the entries' choices once (a budget fixed in advance)


@dataclass
class ReferenceConfig:
    """A published result this row reproduces, shown beside ours by `compare` and `report` (never used in a run)."""

    accuracy: float | None = None  # EM as a fraction, e.g. 0.20
    source: str = ""  # what it is: model, test problems, paper or study


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    baseline_run: str | None = None  # `gsmtune run` prints this run's metrics beside the tuned model's
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    num_eval_samples: int | None = None  # None = the whole eval split
    seed: int = 42
    output_dir: str = "runs/eval"


CHOICES = {
    "dataset.config_name": ("main", "socratic"),
    "dataset.source": ("hub", "local", "symbolic"),
    "prompt.strategy": ("zero_shot", "one_shot", "few_shot"),
    "prompt.one_shot_example": ("study", "gsm8k"),
    "training.method": ("full", "lora", "qlora", "grpo"),
    "training.report_to": ("none", "tensorboard", "wandb", "mlflow"),
    "sweep.sampler": ("tpe", "grid"),
    "training.grpo.rollout": ("decode_loop", "trl"),
}
# Keys that change speed, not results: a resumed run may differ in these.
RUNTIME_KEYS = ("generation.batch_size", "generation.draft_tokens", "output_dir", "baseline_run", "training.report_to",
                "training.logging_steps", "sweep.space", "sweep.study_name", "sweep.sampler", "reference.accuracy", "reference.source",
                "training.gradient_checkpointing", "training.answer_head", "training.padding_free",
                "training.grpo.rollout")  # how a run goes, not what it learns (rollout: the same sampling, faster)


# Keys renamed to the library's own names; the old spelling keeps working (config files, command lines, saved runs).
RENAMED = {"training.max_seq_length": "training.max_length",  # gsmtune's former names -> TRL / transformers names
           "training.min_lr": "training.lr_scheduler_kwargs.min_lr", "training.warmup_ratio": "training.warmup_steps"}


def upgrade_keys(data: dict) -> dict:
    """`data` (changed in place) with renamed keys under their new names; the new name wins when both are given."""
    for old, new in RENAMED.items():
        *old_path, old_leaf = old.split(".")
        *new_path, new_leaf = new.split(".")
        parent = data
        for part in old_path:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or old_leaf not in parent:
            continue
        value = parent.pop(old_leaf)
        target = data
        for part in new_path:
            target = target.setdefault(part, {})
        target.setdefault(new_leaf, value)
    return data


LR_FLOORS = ("min_lr", "min_lr_rate")  # cosine_with_min_lr's two ways to give its floor
FREE_FORM = ("training.lr_scheduler_kwargs.",)  # mappings whose keys are the scheduler's, not ours


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return [prefix]
    keys = [prefix] if prefix else []
    for k, v in node.items():
        keys += _dotted_keys(v, f"{prefix}.{k}" if prefix else str(k))
    return keys


def _schema_keys() -> set[str]:
    return set(_dotted_keys(OmegaConf.to_container(OmegaConf.structured(Config))))


@cache
def trl_fields() -> frozenset[str]:
    """Field names of TRL's SFTConfig and GRPOConfig, which `training.NAME` passes through (trl is imported only when
    a config names one: 3 s)."""
    import dataclasses

    from trl import GRPOConfig, SFTConfig

    return frozenset(f.name for c in (SFTConfig, GRPOConfig) for f in dataclasses.fields(c))


@cache
def training_keys() -> frozenset[str]:
    """gsmtune's own `training.*` names (the rest pass through to TRL)."""
    return frozenset(f.name for f in fields(TrainingConfig))


def passthrough(training: DictConfig) -> dict[str, Any]:
    """The `training.*` keys that are TRL's rather than gsmtune's, as given."""
    return {k: v for k, v in OmegaConf.to_container(training).items() if k not in training_keys()}


def _check_keys(data: dict, where: str) -> None:
    valid = _schema_keys()
    for key in _dotted_keys(data):
        name = key.split(".")[1] if key.startswith("training.") else None
        if name is not None and name not in training_keys():  # not gsmtune's: one of TRL's fields, or a typo
            if name not in trl_fields():
                close = difflib.get_close_matches(name, sorted(trl_fields() | training_keys()), n=1)
                hint = f"; did you mean 'training.{close[0]}'?" if close else ""
                raise GsmtuneError(f"unknown config key '{key}' in {where}: neither gsmtune's nor a field of TRL's "
                                   f"SFTConfig/GRPOConfig{hint}")
            if name == "output_dir":
                raise GsmtuneError(f"training.output_dir in {where}: the trainer writes under the run folder; set output_dir")
            continue
        if key not in valid and not key.startswith(FREE_FORM):
            leaves = (k for k in valid if not any(v.startswith(k + ".") for v in valid))
            parent = next((k for k in leaves if key.startswith(k + ".")), None)
            if parent:
                raise GsmtuneError(f"{parent} in {where} was read as a mapping; quote a value holding ': '")
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise GsmtuneError(f"unknown config key '{key}' in {where}{hint}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a config file, first merging the file its `base:` names (relative to it)."""
    if not path.is_file():
        raise GsmtuneError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise GsmtuneError(f"config {path} extends itself through 'base:'")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path)) or {}
    except Exception as e:  # yaml errors come in many types
        raise GsmtuneError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise GsmtuneError(f"config {path} must be a mapping of keys to values")
    base = data.pop("base", None)
    data = upgrade_keys(data)
    _check_keys(data, str(path))
    if base is None:
        return data
    parent = _read_yaml((path.parent / base), seen + (path.resolve(),))
    return OmegaConf.to_container(OmegaConf.merge(parent, data))


def _parse_overrides(overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise GsmtuneError(f"override '{item}' is not key=value (for example num_eval_samples=50)")
    try:
        data = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:  # YAML parse errors of a value
        raise GsmtuneError(f"could not parse overrides {overrides}: {str(e).splitlines()[0]}; quote values holding ': '") from e
    data = upgrade_keys(data)
    _check_keys(data, "the command line")
    return data


def _validate(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise GsmtuneError(f"{key}={value} is not one of {', '.join(allowed)}")
    if cfg.dataset.source == "local" and not cfg.dataset.path:
        raise GsmtuneError("dataset.source=local needs dataset.path=FOLDER (holding test.jsonl, train.jsonl, ...)")
    if cfg.dataset.eval_split not in ("train", "test", "validation"):
        raise GsmtuneError(f"dataset.eval_split={cfg.dataset.eval_split} is not one of train, test, validation")
    if cfg.num_eval_samples is not None and cfg.num_eval_samples <= 0:
        raise GsmtuneError(f"num_eval_samples={cfg.num_eval_samples} must be positive (or null for the whole split)")
    if "{question}" not in cfg.dataset.prompt_format:
        raise GsmtuneError("dataset.prompt_format must contain '{question}'")
    if cfg.generation.max_new_tokens <= 0 or cfg.generation.batch_size <= 0 or cfg.generation.num_samples <= 0:
        raise GsmtuneError("generation.max_new_tokens, generation.batch_size and generation.num_samples must be positive")
    if cfg.generation.draft_tokens is not None and cfg.generation.draft_tokens < 0:
        raise GsmtuneError(f"generation.draft_tokens={cfg.generation.draft_tokens} must be 0 (off), more, or null (auto)")
    g = cfg.generation
    sampling = g.do_sample or g.num_samples > 1
    if sampling and (g.temperature <= 0 or not 0 < g.top_p <= 1 or g.top_k < 0):
        raise GsmtuneError(f"generation.temperature={g.temperature}, top_p={g.top_p}, top_k={g.top_k}: temperature "
                           "must be > 0, top_p in (0, 1], top_k >= 0 (0 = off); for greedy set generation.do_sample=false")
    _validate_training(cfg.training)


def _validate_passthrough(t: DictConfig) -> None:
    """TRL fields given as training.*: fields of the method's config, with a value of a type its annotation allows."""
    extra = passthrough(t)
    if not extra:
        return
    import dataclasses

    from trl import GRPOConfig, SFTConfig

    config, other = (GRPOConfig, SFTConfig) if t.method == "grpo" else (SFTConfig, GRPOConfig)
    annotations = {f.name: str(f.type) for f in dataclasses.fields(config)}
    for name, value in extra.items():
        if name not in annotations:
            raise GsmtuneError(f"training.{name} is a field of {other.__name__}, not of {config.__name__} "
                               f"(training.method={t.method})")
        allowed = [kind for word, kind in (("bool", bool), ("int", int), ("float", float), ("str", str))
                   if re.search(rf"\b{word}\b", annotations[name])]
        scalar = isinstance(value, (bool, int, float, str))
        fits = any(isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
                   or (kind is float and isinstance(value, int) and not isinstance(value, bool)) for kind in allowed)
        if allowed and scalar and not fits and not re.search(r"\b(Any|dict|list)\b", annotations[name]):
            raise GsmtuneError(f"training.{name}={value!r}: TRL's {config.__name__} expects {annotations[name]}")


def _validate_training(t: DictConfig) -> None:
    """Names transformers would reject only after the model has loaded, checked against its own lists up front."""
    _validate_passthrough(t)
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for key, value, allowed in (("training.optim", t.optim, [o.value for o in OptimizerNames]),
                                ("training.lr_scheduler_type", t.lr_scheduler_type, [s.value for s in SchedulerType])):
        if value not in allowed:
            close = difflib.get_close_matches(value, allowed, n=3, cutoff=0.4)
            raise GsmtuneError(f"{key}={value} is not a name transformers knows"
                               + (f"; did you mean {', '.join(close)}?" if close else f"; one of {', '.join(allowed)}"))
    if t.learning_rate <= 0 or t.per_device_train_batch_size <= 0 or t.gradient_accumulation_steps <= 0:
        raise GsmtuneError("training.learning_rate, per_device_train_batch_size and gradient_accumulation_steps "
                           "must be positive")
    if t.max_length <= 0 or t.lora.r <= 0 or not 0 <= t.lora.dropout < 1:
        raise GsmtuneError("training.max_length and training.lora.r must be positive, training.lora.dropout in [0, 1)")
    if t.warmup_steps < 0 or (t.warmup_steps >= 1 and t.warmup_steps != int(t.warmup_steps)):
        raise GsmtuneError(f"training.warmup_steps={t.warmup_steps}: give a share of the steps below 1 (0.1) or a whole "
                           "number of steps")
    floors = set(LR_FLOORS) & set(t.lr_scheduler_kwargs)
    if len(floors) > 1:
        raise GsmtuneError("training.lr_scheduler_kwargs gives both min_lr and min_lr_rate; keep one")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> DictConfig:
    """Schema defaults <- base chain <- file <- command-line overrides, type-checked and validated."""
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg.training, False)  # TRL's own fields pass through (checked by name in _check_keys)
    try:
        if path is not None:
            cfg = OmegaConf.merge(cfg, _read_yaml(Path(path)))
        cfg = OmegaConf.merge(cfg, _parse_overrides(list(overrides)))
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        key = getattr(e, "full_key", None)
        raise GsmtuneError(f"bad config value{f' for {key}' if key else ''}: {msg}") from e
    _validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def config_differences(a: DictConfig, b: DictConfig, ignore: tuple[str, ...] = RUNTIME_KEYS) -> list[str]:
    """Dotted keys whose values differ between two configs (for refusing to mix runs). A key one of them lacks, saved
    before gsmtune had it, counts as its default: a run keeps resuming across a release that adds a setting (so a new
    setting's default must do what gsmtune did before it, or the setting must be a RUNTIME_KEY)."""
    defaults = _flatten(OmegaConf.to_container(OmegaConf.structured(Config)))
    flat_a = defaults | _flatten(OmegaConf.to_container(a))
    flat_b = defaults | _flatten(OmegaConf.to_container(b))
    keys = sorted(set(flat_a) | set(flat_b))
    return [k for k in keys if k not in ignore and flat_a.get(k) != flat_b.get(k)]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
