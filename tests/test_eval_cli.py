"""End to end on a tiny random model: run folder contents, resume, refusals, one-line errors."""

import json

import pytest

from gsmtune.cli import main
from gsmtune.evaluate import PREDICTIONS
from gsmtune.runs import stage_pieces


@pytest.fixture
def run_args(tiny_model_dir, gsm_dir, tmp_path):
    return ["eval", "base", f"model.name={tiny_model_dir}", "dataset.source=local",
            f"dataset.path={gsm_dir}", "generation.max_new_tokens=8", "generation.batch_size=4",
            "model.dtype=fp32", f"output_dir={tmp_path / 'run'}"]


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_writes_run_folder(run_args, tmp_path, capsys):
    assert main(run_args + ["prompt.strategy=one_shot"]) == 0
    run = tmp_path / "run"
    rows = read_rows(run / PREDICTIONS)
    assert sorted(r["index"] for r in rows) == list(range(6))
    keys = {"index", "question", "gold", "prompt", "completion", "extracted_strict", "extracted_flexible", "correct",
            "num_tokens", "stop_reason"}
    assert keys <= set(rows[0])
    assert all(r["prompt"].startswith("Question: Natalia") for r in rows)
    m = json.loads((run / "metrics.json").read_text())
    assert m["total"] == 6 and m["correct"] == sum(r["correct"] for r in rows)
    assert m["ci95"][0] <= m["accuracy"] <= m["ci95"][1]
    assert {"accuracy_strict", "accuracy_flexible", "no_answer_rate", "truncation_rate", "tokens_per_second",
            "wall_time_seconds", "model", "dataset", "prompt_strategy", "seed"} <= set(m)
    assert "prompt:\n  strategy: one_shot" in (run / "config.yaml").read_text()
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("sampling", [[], ["generation.do_sample=true"], ["generation.num_samples=3"]],
                         ids=["greedy", "sampled", "self_consistency"])
def test_resume_after_interruption_loses_nothing(run_args, tmp_path, sampling):
    """A resumed run writes what an uninterrupted one would have: sampled rows too (each problem's own streams)."""
    run_args = run_args + sampling
    assert main(run_args) == 0
    pred = tmp_path / "run" / PREDICTIONS
    full = read_rows(pred)
    lines = pred.read_text().splitlines()
    pred.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # killed mid-write: a torn last line
    assert main(run_args + ["--resume", "generation.batch_size=2"]) == 0  # batch size may change on resume
    resumed = read_rows(pred)
    assert sorted(r["index"] for r in resumed) == list(range(6))
    def texts(rows):
        return {r["index"]: [r["completion"], *(x["completion"] for x in r.get("samples", []))] for r in rows}

    assert texts(resumed) == texts(full)
    run = tmp_path / "run"
    assert len(stage_pieces(run, "eval")) == 2  # the process that began it and the one that finished it
    kept = {f: (run / f).read_text() for f in ("metrics.json", "provenance.json", "config.yaml")}
    assert main(run_args + ["--resume", "generation.batch_size=3"]) == 0  # finished: nothing to do, nothing rewritten
    assert {f: (run / f).read_text() for f in kept} == kept


def test_float32_completions_do_not_depend_on_the_batch(run_args, gsm_dir, tmp_path):
    """The mode the study commits: each problem's completion is the same decoded alone or in a batch of 32 (36
    problems, so the loop also runs full batches and lets waiting prompts join)."""
    rows = [json.loads(line) for line in (gsm_dir / "test.jsonl").read_text().splitlines()]
    many = [{"question": f"{r['question']} Case {i}.", "answer": r["answer"]} for i in range(6) for r in rows]
    (gsm_dir / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in many))
    longer = [a for a in run_args if not a.startswith(("generation.max_new_tokens", "output_dir"))] + [
        "generation.max_new_tokens=24", "model.dtype=float32"]
    assert main(longer + [f"output_dir={tmp_path / 'alone'}", "generation.batch_size=1"]) == 0
    assert main(longer + [f"output_dir={tmp_path / 'together'}", "generation.batch_size=32"]) == 0
    alone, together = ({r["index"]: r["completion"] for r in read_rows(tmp_path / d / PREDICTIONS)}
                       for d in ("alone", "together"))
    assert alone == together and len(alone) == 36
    assert len({len(c) for c in alone.values()}) > 1  # rows of different lengths: the batch really changed shape


def test_num_eval_samples_subset(run_args, tmp_path):
    assert main(run_args + ["num_eval_samples=3", "seed=5"]) == 0
    assert len(read_rows(tmp_path / "run" / PREDICTIONS)) == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["num_eval_samples=99"], "num_eval_samples=99 is larger than the split (6 problems)"),
        (["model.name=/no/such/model"], "model.name=/no/such/model: no such folder"),
        (["prompt.stratgy=one_shot"], "did you mean 'prompt.strategy'"),
    ],
)
def test_user_mistakes_are_one_line(run_args, extra, message, capsys):
    assert main(run_args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_data_folder_and_malformed_row(run_args, gsm_dir, tmp_path, capsys):
    assert main(run_args + [f"dataset.path={tmp_path / 'missing'}"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (gsm_dir / "test.jsonl").write_text('{"question": "x", "answer": "#### 1"}\nnot json\n')
    assert main(run_args) == 2
    assert "test.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_existing_run_is_protected(run_args, tmp_path, capsys):
    assert main(run_args) == 0
    assert main(run_args) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    assert main(run_args + ["seed=3", "--resume"]) == 2
    assert "different config (seed)" in capsys.readouterr().err
    before = (tmp_path / "run" / PREDICTIONS).read_text()
    assert before  # nothing was lost by the refusals
    assert main(run_args + ["prompt.strategy=one_shot", "--overwrite"]) == 0
    assert all(r["prompt"].startswith("Question: Natalia") for r in read_rows(tmp_path / "run" / PREDICTIONS))


def test_unknown_bundled_model(run_args, capsys):
    assert main(run_args + ["model.name=bundled:gemma-9"]) == 2
    assert "unknown bundled model 'bundled:gemma-9'" in capsys.readouterr().err
