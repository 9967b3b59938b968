import json

import pytest
from conftest import row, write_run

from gsmtune.analysis import (
    calculations,
    categorize,
    changed_problems,
    compare_pair,
    contamination,
    error_report,
    with_votes,
)
from gsmtune.runs import load_run, write_training_data


@pytest.mark.parametrize(
    ("completion", "stop", "expected"),
    [
        (" She sold 48/2 = <<48/2=24>>24 clips.\n#### 24", "answer_line", None),  # correct: no category
        (" It costs $1,200.50 in total", "max_tokens", "truncated"),
        (" 46/2 = 23\n#### 23\nQuestion: A new problem", "eos", "hallucinated_continuation"),  # stop rules off
        (" She sold 24 clips.", "new_question", "hallucinated_continuation"),  # repeated a new question
        (" She sold twenty clips.", "eos", "no_answer"),
        (" Half of 48 is <<48/2=23>>23.\n#### 23", "answer_line", "arithmetic"),
        (" 3.5*60=200 minutes\n#### 200", "answer_line", "arithmetic"),
        (" 3.5*60=210 minutes\n#### 210", "answer_line", "reasoning"),  # 3.5*60 is 210: the arithmetic is right
        (" It drops 5-8=-3 degrees... so 10/3 = 3.33\n#### 3.33", "answer_line", "reasoning"),
        (" She has -5 + 2 = -4 apples\n#### -4", "answer_line", "arithmetic"),
        (" 48 / 2 = 24 so she sold 24+48 = 72\n#### 72", "answer_line", "reasoning"),
    ],
)
def test_categories(completion, stop, expected):
    assert categorize(row(completion, stop=stop)) == expected


def test_calculations_found_in_both_notations():
    calcs = calculations("48/2 = <<48/2=24>>24 and 24 + 48 = 72, then (2+3)*4 = 21")
    assert [(c.expression, c.written, c.correct) for c in calcs] == [
        ("48/2", "24", True), ("24 + 48", "72", True), ("(2+3)*4", "21", False)]


def test_compare_pair_and_changes(tmp_path):
    base = write_run(tmp_path / "base", [row(" #### 24" if i < 2 else " no", index=i) for i in range(10)])
    tuned = write_run(tmp_path / "tuned", [row(" #### 24" if i != 1 else " no", index=i) for i in range(12)])
    c = compare_pair(base, tuned)
    assert (c.n, c.only_a, c.only_b, c.both_right, c.both_wrong) == (10, 1, 8, 1, 0)
    assert c.partial and c.diff == pytest.approx(0.7) and c.p_value == pytest.approx(0.0390625)
    assert c.diff_ci[0] <= c.diff <= c.diff_ci[1]
    changes = changed_problems(base, tuned)
    assert changes["fixed"] == list(range(2, 10)) and changes["broken"] == [1] and changes["both_right"] == [0]
    report = error_report(base)
    assert report.counts["no_answer"] == 8 and report.rate("no_answer") == 0.8 and len(report.examples["no_answer"]) == 3


def test_runs_on_other_problems_are_not_paired(tmp_path):
    """A validation run and a test run share indices, not problems: only rows with the same question pair up."""
    from gsmtune.analysis import all_pairs

    test = write_run(tmp_path / "test", [row(" #### 24", index=i, question=f"test {i}") for i in range(5)])
    val = write_run(tmp_path / "val", [row(" no", index=i, question=f"train {i}") for i in range(5)])
    mixed = write_run(tmp_path / "mixed", [row(" no", index=i, question=f"{'test' if i < 2 else 'train'} {i}")
                                           for i in range(5)])
    assert compare_pair(test, val).n == 0 and all_pairs([test, val]) == []
    val.metrics["dataset"], test.metrics["dataset"] = "local:openai/gsm8k/main/validation", "hub:openai/gsm8k/main/test"
    assert val.dataset == "? (?, validation)" and test.dataset == "? (?)"  # tables say which split a run scored
    assert compare_pair(test, mixed).n == 2 and changed_problems(test, mixed)["broken"] == [0, 1]


def test_self_consistency_runs_are_compared_by_their_vote_too(tmp_path):
    from gsmtune.report import comparison_markdown

    rows = [row(" #### 24" if i == 0 else " no", index=i)
            | {"correct_majority": i in (1, 2), "majority_answer": "24" if i in (1, 2) else None} for i in range(4)]
    greedy, vote = with_votes([write_run(tmp_path / "sc", rows, config="generation:\n  num_samples: 5\n  calculator: true\n")])
    assert vote.name == "sc maj@5" and vote.metrics["correct"] == 2 and greedy.metrics["correct"] == 1
    assert vote.metrics["total"] == 4 and vote.predictions[1]["extracted_strict"] == "24"
    c = compare_pair(greedy, vote)
    assert (c.only_a, c.only_b, c.both_wrong) == (1, 2, 1)
    assert vote.method == "? + calculator"
    assert "| sc maj@5 |" in comparison_markdown([greedy]) and "| sc | sc maj@5 | 4 |" in comparison_markdown([greedy])


def test_contamination_reads_the_question_hashes_in_the_run_folder(tmp_path):
    run = write_run(tmp_path / "lora", [row(" #### 24", index=i, question=q)
                                        for i, q in enumerate(["q3", "Tom has 7 apples", "Ann has 2 pears"])])
    assert contamination(run) is None  # no training data recorded: not trained by gsmtune
    write_training_data(run.path, ["q3 ", "Tom has 5 apples"])
    assert contamination(load_run(run.path)) == ([0], [1])


def test_a_reference_number_stands_beside_test_runs_only(tmp_path):
    """The reference study's number is a test-set score: a sweep trial scored on validation gets none beside it."""
    from gsmtune.analysis import summary_rows

    config = "reference:\n  accuracy: 0.31\n  source: gemma-2b-it\n"
    runs = []
    for split in ("test", "validation"):
        run = write_run(tmp_path / split, [row(" #### 24")], config=config)
        metrics = json.loads((run.path / "metrics.json").read_text()) | {"dataset": f"local:openai/gsm8k/main/{split}"}
        (run.path / "metrics.json").write_text(json.dumps(metrics))
        runs.append(load_run(run.path))
    test, validation = summary_rows(runs)
    assert (test["reference_em"], validation["reference_em"]) == (0.31, None)
    assert runs[1].dataset == "? (?, validation)" and runs[0].split == "test"


def test_a_sweep_trial_is_named_by_the_values_it_tried(tmp_path):
    """Trial folders are hashes: tables say which learning rate (or other searched key) each one ran."""
    config = ("training:\n  learning_rate: 3.0e-05\nsweep:\n  space:\n  - key: training.learning_rate\n"
              "    choices: [1.0e-05, 3.0e-05]\n")
    trial = write_run(tmp_path / "sweep" / "trial-904deb450e", [row(" #### 24")], config=config)
    plain = write_run(tmp_path / "lr", [row(" #### 24")], config=config)  # a sweep's config, not a trial
    (trial.path / "train_metrics.json").write_text(json.dumps({"method": "full"}))
    assert load_run(trial.path).method == "full SFT, learning_rate 3e-05"
    assert "learning_rate" not in plain.method
