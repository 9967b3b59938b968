import json
import subprocess

import pytest
from omegaconf import OmegaConf

from gsmtune.errors import GsmtuneError
from gsmtune.runs import (
    PROVENANCE,
    TRAINING_DATA,
    fingerprint,
    git_commit,
    load_run,
    loaded_commit,
    prepare,
    question_hash,
    read_predictions,
    stage_pieces,
    write_atomic,
    write_provenance,
    write_training_data,
)


def finished_eval(path, config="prompt:\n  strategy: zero_shot\n", metrics=None):
    """A run folder as `gsmtune eval` leaves it, one scored problem."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(config)
    (path / "predictions.jsonl").write_text(json.dumps({"index": 0, "question": "q", "correct": True}) + "\n")
    (path / "metrics.json").write_text(json.dumps({"correct": 1, "total": 1} | (metrics or {})))
    return path


def test_prepare_refuses_to_mix_runs(tmp_path):
    cfg = OmegaConf.create({"output_dir": str(tmp_path / "run"), "seed": 1})
    out = prepare(cfg, resume=False, overwrite=False)
    with pytest.raises(GsmtuneError, match="--resume to continue it or --overwrite"):
        prepare(cfg, resume=False, overwrite=False)
    assert prepare(cfg, resume=True, overwrite=False) == out
    other = OmegaConf.merge(cfg, {"seed": 2})
    with pytest.raises(GsmtuneError, match="different config"):
        prepare(other, resume=True, overwrite=False)
    (out / "stale.txt").write_text("x")
    prepare(other, resume=False, overwrite=True)
    assert not (out / "stale.txt").exists()


def test_torn_predictions_line_is_skipped_and_repaired_only_on_request(tmp_path):
    path = tmp_path / "predictions.jsonl"
    text = json.dumps({"index": 3, "x": 1}) + "\n" + '{"index": 4, "x"'
    path.write_text(text)
    assert list(read_predictions(path)) == [3] and path.read_text() == text  # analysis reads, never writes
    assert list(read_predictions(path, repair=True)) == [3] and path.read_text() == json.dumps({"index": 3, "x": 1}) + "\n"


def test_provenance_records_each_stage_with_versions(tmp_path):
    write_provenance(tmp_path, "train", "cpu", "bfloat16")
    write_provenance(tmp_path, "eval", "cpu", "float32")
    record = json.loads((tmp_path / PROVENANCE).read_text())
    assert record["format"] == 2 and (record["train"]["dtype"], record["eval"]["dtype"]) == ("bfloat16", "float32")
    assert record["train"]["cpu"].endswith(("; bf16 native", "; bf16 not native"))  # which CPU made the row
    import torch
    import transformers

    assert record["eval"]["torch"] == torch.__version__ and record["eval"]["transformers"] == transformers.__version__
    assert record["eval"]["git_commit"] == loaded_commit()
    commit = git_commit()
    assert commit is None or len(commit.removesuffix("+dirty")) == 40


def test_a_stage_continued_keeps_each_process_record_and_a_fresh_one_replaces_them(tmp_path):
    write_provenance(tmp_path, "train", "cpu", "bfloat16")
    write_provenance(tmp_path, "train", "cpu", "float32", continues=True)
    write_provenance(tmp_path, "train", "cuda", "bfloat16", continues=True)
    assert [(p["device"], p["dtype"]) for p in stage_pieces(tmp_path, "train")] == [
        ("cpu", "bfloat16"), ("cpu", "float32"), ("cuda", "bfloat16")]
    write_provenance(tmp_path, "train", "cpu", "float32")  # started again from step 0: the earlier pieces made none of it
    assert [p["dtype"] for p in stage_pieces(tmp_path, "train")] == ["float32"] and stage_pieces(tmp_path, "eval") == []


def test_an_evaluation_of_a_trained_model_reads_its_own_folder_alone(tmp_path):
    trained = tmp_path / "lora"
    (trained / "model").mkdir(parents=True)
    (trained / "train_metrics.json").write_text(json.dumps({"method": "lora", "model": "bundled:gemma-3-270m"}))
    write_training_data(trained, ["Tom has 3 apples."])
    run_dir = finished_eval(tmp_path / "lora_fp32")
    write_provenance(run_dir, "eval", "cpu", "float32", str(trained / "model"))
    (trained / "train_metrics.json").unlink()  # the training folder can go: the eval folder holds what it needs
    run = load_run(run_dir)
    assert run.method == "lora SFT, zero-shot [float32]"
    assert run.training_data == json.loads((trained / TRAINING_DATA).read_text())


def test_folders_from_before_provenance_still_read(tmp_path):
    """Format 1: the dtype from metrics.json or the config, the training from train_metrics.json beside the model."""
    (tmp_path / "lora" / "model").mkdir(parents=True)
    (tmp_path / "lora" / "train_metrics.json").write_text(json.dumps({"method": "lora"}))
    plain = finished_eval(tmp_path / "a")
    assert load_run(plain).method == "zero-shot"
    run = load_run(finished_eval(tmp_path / "b", metrics={"model_path": str(tmp_path / "lora" / "model"),
                                                           "dtype": "float32"}))
    assert run.method == "lora SFT, zero-shot [float32]" and run.provenance["format"] == 1
    configured = finished_eval(tmp_path / "c", config="prompt:\n  strategy: zero_shot\nmodel:\n  dtype: fp32\n")
    assert load_run(configured).method == "zero-shot [fp32]"


def test_fingerprint_hashes_exact_and_number_normalised_questions():
    f = fingerprint(["Tom has 3 apples.", " Tom has 3 apples. ", "Tom has 12 apples."])
    assert f["questions"] == 3 and len(f["exact"]) == 2 and len(f["normalized"]) == 1
    assert question_hash("Tom has 3 apples.") in f["exact"] and "Tom" not in json.dumps(f)


def test_fingerprint_tells_main_from_socratic_solutions():
    """The same questions with other solutions (GSM8K main vs socratic) give another digest; order does not matter."""
    questions = ["Tom has 3 apples.", "Ann has 2 pears."]
    main = fingerprint(questions, ["3 + 0 = 3\n#### 3", "#### 2"])
    socratic = fingerprint(questions, ["How many? ** 3 + 0 = 3\n#### 3", "#### 2"])
    assert main["exact"] == socratic["exact"] and main["examples_sha256"] != socratic["examples_sha256"]
    assert fingerprint(questions[::-1], ["#### 2", "3 + 0 = 3\n#### 3"])["examples_sha256"] == main["examples_sha256"]


def test_training_data_includes_the_training_its_model_started_from(tmp_path):
    """GRPO on an SFT adapter saw both runs' questions."""
    sft = tmp_path / "sft"
    (sft / "model").mkdir(parents=True)
    (sft / "train_metrics.json").write_text(json.dumps({"method": "lora", "model": "m"}))
    write_training_data(sft, ["a question", "another one"])
    grpo = tmp_path / "grpo"
    grpo.mkdir()
    write_training_data(grpo, ["a third one"], str(sft / "model"))
    data = json.loads((grpo / TRAINING_DATA).read_text())
    assert data["questions"] == 3 and len(data["exact"]) == 3 and data["includes"] == str(sft)


def test_a_write_cut_short_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_atomic(path, "old")

    def killed(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr("gsmtune.runs.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_dirty_means_changed_code_not_changed_results(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)

    (tmp_path / "src").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "src" / "code.py").write_text("a = 1\n")
    (tmp_path / "results" / "metrics.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    clean = git_commit(tmp_path / "src")
    assert clean is not None and len(clean) == 40
    (tmp_path / "results" / "metrics.json").write_text('{"accuracy": 0.5}\n')  # a study writing its results
    assert git_commit(tmp_path / "src") == clean
    (tmp_path / "src" / "code.py").write_text("a = 2\n")
    assert git_commit(tmp_path / "src") == clean + "+dirty"
