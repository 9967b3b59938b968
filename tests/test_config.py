from pathlib import Path

import pytest

from gsmtune.cli import CONFIGS
from gsmtune.config import config_differences, load_config
from gsmtune.errors import GsmtuneError

SHIPPED = [p for p in sorted(CONFIGS.rglob("*.yaml"))
           if p.parent.name != "accelerate"]  # accelerate configs have their own schema


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_and_overrides():
    cfg = load_config(None, ["num_eval_samples=5", "prompt.strategy=one_shot", "generation.max_new_tokens=64"])
    assert cfg.num_eval_samples == 5 and cfg.prompt.strategy == "one_shot" and cfg.generation.max_new_tokens == 64
    assert cfg.dataset.prompt_format == "Question: {question}\nAnswer:"


def test_base_chain_file_then_command_line(tmp_path):
    write(tmp_path / "base.yaml", "seed: 1\nprompt:\n  strategy: one_shot\nnum_eval_samples: 10\n")
    write(tmp_path / "exp.yaml", "base: base.yaml\nseed: 2\n")
    cfg = load_config(tmp_path / "exp.yaml", ["num_eval_samples=3"])
    assert (cfg.seed, cfg.prompt.strategy, cfg.num_eval_samples) == (2, "one_shot", 3)


def test_unknown_key_in_file_names_key_and_closest(tmp_path):
    write(tmp_path / "c.yaml", "prompt:\n  stratgy: one_shot\n")
    with pytest.raises(GsmtuneError, match=r"unknown config key 'prompt.stratgy'.*did you mean 'prompt.strategy'"):
        load_config(tmp_path / "c.yaml")


def test_unknown_key_on_command_line():
    with pytest.raises(GsmtuneError, match=r"'num_eval_sample'.*'num_eval_samples'"):
        load_config(None, ["num_eval_sample=5"])


def test_unknown_key_in_base_file(tmp_path):
    write(tmp_path / "base.yaml", "modle:\n  name: x\n")
    write(tmp_path / "exp.yaml", "base: base.yaml\n")
    with pytest.raises(GsmtuneError, match=r"'modle'.*base.yaml.*'model'"):
        load_config(tmp_path / "exp.yaml")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["num_eval_samples=abc"], "num_eval_samples"),
        (["prompt.strategy=two_shot"], "prompt.strategy=two_shot is not one of"),
        (["dataset.config_name=hard"], "dataset.config_name"),
        (["dataset.source=local"], "dataset.path"),
        (["num_eval_samples=0"], "must be positive"),
        (["dataset.prompt_format=Question"], "{question}"),
        (["seed"], "key=value"),
        (["training.optim=adamw_nonsense"], "training.optim=adamw_nonsense is not a name transformers knows; did you"),
        (["training.lr_scheduler_type=zigzag"], "training.lr_scheduler_type=zigzag is not a name transformers knows"),
        (["generation.do_sample=true", "generation.temperature=-1"], "temperature must be > 0"),
        (["generation.num_samples=5", "generation.top_p=1.5"], r"top_p in \(0, 1\]"),
        (["training.learning_rate=0"], "must be positive"),
        (["training.lora.dropout=1.2"], r"in \[0, 1\)"),
    ],
)
def test_bad_values(overrides, message):
    with pytest.raises(GsmtuneError, match=message):
        load_config(None, overrides)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(GsmtuneError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(GsmtuneError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "a: [1, 2\n"))


def test_config_differences_ignores_runtime_keys():
    a = load_config(None, ["generation.batch_size=4"])
    b = load_config(None, ["generation.batch_size=8", "seed=7"])
    assert config_differences(a, b) == ["seed"]


def test_a_setting_added_since_a_run_was_saved_counts_as_its_default():
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(load_config(None))
    del saved["prompt"]["one_shot_example"]  # a run folder from before the setting existed
    saved = OmegaConf.create(saved)
    assert config_differences(saved, load_config(None)) == []
    assert config_differences(saved, load_config(None, ["prompt.one_shot_example=gsm8k"])) == ["prompt.one_shot_example"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_configs_load(path):
    load_config(path)


STUDY_ROWS = [p for p in SHIPPED if p.parent.name == "cpu" and load_config(p).output_dir.startswith("results/cpu/")
              and not load_config(p).sweep.space]  # sweeps tune on validation; they are not rows
LONGEST_TRAIN_ROW = {"main": 544, "socratic": 648}  # Gemma tokens, prompt + solution + EOS (issue 12)


@pytest.mark.parametrize("path", STUDY_ROWS, ids=lambda p: p.stem)
def test_study_rows_are_committed_the_way_the_study_says(path):
    """Every CPU study row: all 1,319 test problems, float32 decoding (batch-invariant: test_eval_cli); trained rows
    see all of train but the shared validation split (nothing cut: test_study_rows_cut_nothing)."""
    cfg = load_config(path)
    assert cfg.num_eval_samples is None and cfg.model.dtype == "float32"
    assert cfg.dataset.validation_size == 300 and cfg.seed == 42
    if path.stem.startswith(("full_", "lora_")):
        assert cfg.dataset.train_samples is None and cfg.training.num_train_epochs >= 1
    assert len(STUDY_ROWS) == 12  # four base rows, four trained rows, two more LoRA main seeds, two GRPO rows


@pytest.mark.parametrize("path", STUDY_ROWS + [p for p in SHIPPED if p.parent.name == "gemma-2b-it"],
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_study_rows_cut_nothing(path):
    """Every row of the study, CPU and GPU (google/gemma-2b-it): >= 512 new tokens and room for the longest training
    row as Gemma 3's tokenizer counts it (gemma-2b-it's own is not at hand offline; its configs leave a margin)."""
    cfg = load_config(path)
    assert cfg.generation.max_new_tokens >= 512
    if path.stem.startswith(("full_", "lora_")):
        assert cfg.training.max_length >= LONGEST_TRAIN_ROW[cfg.dataset.config_name]


def test_unparsable_override_is_one_line():
    with pytest.raises(GsmtuneError, match="dataset.prompt_format in the command line was read as a mapping; quote") as e:
        load_config(None, ["dataset.prompt_format=Q: {question}"])
    assert "\n" not in str(e.value)


def test_renamed_keys_keep_working(tmp_path):
    """`training.max_seq_length` (gsmtune's old name) is read as TRL's `training.max_length`, in files, on the command
    line and in the config.yaml of an older run folder, which a resume still accepts."""
    from omegaconf import OmegaConf

    from gsmtune.runs import prepare

    assert load_config(None, ["training.max_seq_length=300"]).training.max_length == 300
    (tmp_path / "old.yaml").write_text("training:\n  max_seq_length: 320\n")
    assert load_config(tmp_path / "old.yaml").training.max_length == 320
    assert load_config(tmp_path / "old.yaml", ["training.max_length=100"]).training.max_length == 100
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "training.max_length=320"])
    (tmp_path / "run").mkdir()
    saved = OmegaConf.to_container(cfg)
    saved["training"]["max_seq_length"] = saved["training"].pop("max_length")
    (tmp_path / "run" / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    assert prepare(cfg, resume=True, overwrite=False) == tmp_path / "run"


def test_scheduler_and_warmup_use_transformers_names(tmp_path):
    """`training.min_lr` and `training.warmup_ratio` (gsmtune's former keys) are read as `lr_scheduler_kwargs.min_lr`
    and `warmup_steps`, also from an older run folder's config.yaml; the floor reaches cosine_with_min_lr alone."""
    from omegaconf import OmegaConf

    from gsmtune.runs import prepare
    from gsmtune.training.common import scheduler_kwargs

    old = load_config(None, ["training.min_lr=2e-5", "training.warmup_ratio=0.05"]).training
    assert (dict(old.lr_scheduler_kwargs), old.warmup_steps) == ({"min_lr": 2e-5}, 0.05)
    assert scheduler_kwargs(old) == {"min_lr": 2e-5}
    assert scheduler_kwargs(load_config(None).training) == {"min_lr_rate": 0.1}  # unset: a tenth of the peak
    rate = load_config(None, ["training.lr_scheduler_kwargs={min_lr_rate: 0.05}"]).training
    assert scheduler_kwargs(rate) == {"min_lr_rate": 0.05}
    assert scheduler_kwargs(load_config(None, ["training.min_lr=2e-5", "training.lr_scheduler_type=cosine"]).training) == {}
    with pytest.raises(GsmtuneError, match="both min_lr and min_lr_rate; keep one"):
        load_config(None, ["training.min_lr=1e-6", "training.lr_scheduler_kwargs.min_lr_rate=0.1"])
    with pytest.raises(GsmtuneError, match="training.warmup_steps=2.5: give a share of the steps below 1"):
        load_config(None, ["training.warmup_steps=2.5"])

    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "training.min_lr=3e-6", "training.warmup_ratio=0.1"])
    (tmp_path / "run").mkdir()
    saved = OmegaConf.to_container(cfg)
    saved["training"]["min_lr"] = saved["training"].pop("lr_scheduler_kwargs")["min_lr"]
    saved["training"]["warmup_ratio"] = saved["training"].pop("warmup_steps")
    (tmp_path / "run" / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    assert prepare(cfg, resume=True, overwrite=False) == tmp_path / "run"


def test_trl_fields_pass_through_checked_by_name_and_type():
    cfg = load_config(None, ["training.neftune_noise_alpha=5", "training.dataloader_num_workers=1"])
    from gsmtune.config import passthrough

    assert passthrough(cfg.training) == {"neftune_noise_alpha": 5, "dataloader_num_workers": 1}
    with pytest.raises(GsmtuneError, match="neither gsmtune's nor a field of TRL's SFTConfig/GRPOConfig; did you mean "
                                           "'training.neftune_noise_alpha'"):
        load_config(None, ["training.neftune_noise_alfa=5"])
    with pytest.raises(GsmtuneError, match="training.neftune_noise_alpha='loud': TRL's SFTConfig expects float"):
        load_config(None, ["training.neftune_noise_alpha=loud"])
    with pytest.raises(GsmtuneError, match="training.num_generations is a field of GRPOConfig, not of SFTConfig"):
        load_config(None, ["training.num_generations=4"])
    with pytest.raises(GsmtuneError, match="set output_dir"):
        load_config(None, ["training.output_dir=/tmp/x"])
