import json

import pytest

from gsmtune.cli import main
from gsmtune.evaluate import majority_vote


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        (["18", "18", "20"], "18"),
        (["20", "18", "18", "20"], "20"),  # tie: the answer sampled first wins
        (["18", "18.0", "20"], "18"),  # numerically equal answers are pooled
        ([None, None, "5"], "5"),
        ([None, None], None),
        ([], None),
        (["-3", "3", "-3"], "-3"),
    ],
)
def test_majority_vote(answers, expected):
    assert majority_vote(answers) == expected


@pytest.mark.parametrize("calculator", [False, True])
def test_self_consistency_run(tiny_model_dir, gsm_dir, tmp_path, calculator):
    out = tmp_path / "sc"
    assert main(["eval", "base", f"model.name={tiny_model_dir}", "dataset.source=local",
                 f"dataset.path={gsm_dir}", "generation.max_new_tokens=6", "generation.batch_size=4",
                 "generation.num_samples=3", "generation.temperature=1.0", "model.dtype=fp32", f"output_dir={out}",
                 f"generation.calculator={calculator}"]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(len(r["samples"]) == 3 and "majority_answer" in r and "correct_pass_at_k" in r for r in rows)
    assert any(len({s["completion"] for s in r["samples"]}) > 1 for r in rows)  # sampled, not greedy copies
    m = json.loads((out / "metrics.json").read_text())
    assert {"accuracy_maj_at_3", "accuracy_pass_at_3", "accuracy_greedy", "ci95_maj_at_3"} <= set(m)
    assert m["accuracy_pass_at_3"] >= m["accuracy_maj_at_3"]
    assert m["dtype"] == "float32"  # recorded: bf16 and float32 decoding of one model can differ
    assert ("sample_calculator_calls" in m) == calculator  # calculator use in the samples, not only in greedy
    assert all(isinstance(s["calculator_calls"], int) for r in rows for s in r["samples"])


def test_older_runs_without_per_sample_calculator_fields_still_score():
    """A run begun before samples recorded calculator calls resumes: its sample totals are left out, not invented."""
    from gsmtune.config import load_config
    from gsmtune.evaluate import _extra_metrics

    cfg = load_config(None, ["generation.num_samples=2", "generation.calculator=true"])
    row = {"correct": True, "correct_majority": True, "correct_pass_at_k": True, "calculator_calls": 1,
           "calculator_changed": 0, "samples": [{"completion": " #### 1"}, {"completion": " #### 2"}]}
    m = _extra_metrics([row], cfg)
    assert m["calculator_calls"] == 1 and m["accuracy_maj_at_2"] == 1.0 and "sample_calculator_calls" not in m


def test_self_consistency_samples_do_not_depend_on_the_batch(tiny_model_dir, gsm_dir, tmp_path):
    """A committed self-consistency row can be re-checked at any batch size: each sample has its own random stream
    (seed, problem, sample) and float32 logits."""
    def samples(batch_size):
        out = tmp_path / f"b{batch_size}"
        assert main(["eval", "base", f"model.name={tiny_model_dir}", "dataset.source=local", f"dataset.path={gsm_dir}",
                     "generation.max_new_tokens=6", f"generation.batch_size={batch_size}", "generation.num_samples=3",
                     "generation.temperature=1.0", "model.dtype=fp32", f"output_dir={out}"]) == 0
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        return {r["index"]: [s["completion"] for s in r["samples"]] for r in rows}

    assert samples(4) == samples(1)
