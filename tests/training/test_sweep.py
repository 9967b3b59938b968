import json

import optuna
import pytest
from conftest import overrides

from gsmtune.cli import main

SPACE = ('sweep.space=[{key: training.learning_rate, type: float, low: 1.0e-4, high: 1.0e-2, log: true},'
         ' {key: training.lora.r, choices: [2, 4]}]')


def sweep_cmd(model, data, out, trials):
    return ["sweep", "base", *overrides(model, data, out, "training.max_steps=2", "dataset.validation_size=4",
                                                      "dataset.train_samples=8", "generation.max_new_tokens=4"),
            SPACE, "--trials", str(trials)]


def completed(out):
    study = optuna.load_study(study_name="gsmtune", storage=f"sqlite:///{out / 'sweep.db'}")
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


def test_sweep_resumes_after_interruption(tiny_model_dir, train_dir, tmp_path):
    """One trial finished, one cut off mid-way (left RUNNING, as after SIGKILL): the rerun keeps the first,
    reruns the second with the same parameters, and stops at 3 finished trials."""
    out = tmp_path / "sweep"
    assert main(sweep_cmd(tiny_model_dir, train_dir, out, 1)) == 0
    study = optuna.load_study(study_name="gsmtune", storage=f"sqlite:///{out / 'sweep.db'}")
    cut_off = study.ask({"training.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                         "training.lora.r": optuna.distributions.CategoricalDistribution([2, 4])})
    first = completed(out)
    assert main(sweep_cmd(tiny_model_dir, train_dir, out, 3)) == 0
    done = completed(out)
    assert len(done) == 3 and first[0].number in {t.number for t in done}  # the finished trial was kept
    assert cut_off.params in [t.params for t in done]  # the cut-off trial ran again with its parameters
    states = {t.number: t.state for t in optuna.load_study(study_name="gsmtune", storage=f"sqlite:///{out / 'sweep.db'}").trials}
    assert states[cut_off.number] == optuna.trial.TrialState.FAIL
    results = json.loads((out / "sweep_results.json").read_text())
    assert results["best_value"] == max(t.value for t in done)
    best = (out / "best.yaml").read_text()
    assert f"learning_rate: {results['best_params']['training.learning_rate']}" in best
    for t in done:  # every trial was scored on validation data carved from train, never test
        metrics = json.loads((out / t.user_attrs["run_dir"].split("/")[-1] / "metrics.json").read_text())
        assert metrics["dataset"].endswith("/validation") and metrics["total"] == 4


def test_sweep_refuses_without_validation(tiny_model_dir, train_dir, tmp_path, capsys):
    cmd = ["sweep", "base", *overrides(tiny_model_dir, train_dir, tmp_path / "s"), SPACE, "--trials", "1"]
    assert main(cmd) == 2
    assert "dataset.validation_size > 0" in capsys.readouterr().err


@pytest.mark.parametrize("entry", ["[{key: training.learning_rate, type: uniform, low: 1, high: 2}]", "[{type: float}]"])
def test_bad_space_entry(tiny_model_dir, train_dir, tmp_path, capsys, entry):
    cmd = ["sweep", "base", *overrides(tiny_model_dir, train_dir, tmp_path / "s", "dataset.validation_size=4"),
           f"sweep.space={entry}", "--trials", "1"]
    assert main(cmd) == 2
    assert "needs 'key' and a 'type'" in capsys.readouterr().err


def test_grid_sweep_runs_each_choice_once(tiny_model_dir, train_dir, tmp_path, capsys):
    """A fixed budget: the grid's combinations, each once; more trials than the grid holds is refused up front."""
    out = tmp_path / "grid"
    cmd = ["sweep", "base", *overrides(tiny_model_dir, train_dir, out, "training.max_steps=1", "dataset.validation_size=2",
                                       "dataset.train_samples=4", "generation.max_new_tokens=2", "sweep.sampler=grid"),
           "sweep.space=[{key: training.learning_rate, choices: [1.0e-3, 1.0e-2]}]"]
    assert main([*cmd, "--trials", "3"]) == 2
    assert "more than the grid's 2 combinations" in capsys.readouterr().err
    assert main([*cmd, "--trials", "2"]) == 0
    assert sorted(t.params["training.learning_rate"] for t in completed(out)) == [1e-3, 1e-2]


def test_grid_needs_choices(tiny_model_dir, train_dir, tmp_path, capsys):
    cmd = ["sweep", "base", *overrides(tiny_model_dir, train_dir, tmp_path / "s", "dataset.validation_size=4",
                                       "sweep.sampler=grid"), SPACE, "--trials", "1"]
    assert main(cmd) == 2
    assert "needs 'choices' in every sweep.space entry; training.learning_rate has none" in capsys.readouterr().err


def test_grid_reruns_a_failed_point_not_a_finished_one(tiny_model_dir, train_dir, tmp_path, monkeypatch):
    """A trial stopped by a handled signal or an error ends FAIL, which the grid counts as visited: the rerun must run
    that point again, not re-evaluate a finished one. A trial killed outright (left RUNNING) too."""
    import gsmtune.evaluate

    out = tmp_path / "grid"
    cmd = ["sweep", "base", *overrides(tiny_model_dir, train_dir, out, "training.max_steps=1", "dataset.validation_size=2",
                                       "dataset.train_samples=4", "generation.max_new_tokens=2", "sweep.sampler=grid",
                                       "seed=3"),  # with seed 3 the grid, left alone, re-evaluates the finished point
           "sweep.space=[{key: training.learning_rate, choices: [1.0e-3, 1.0e-2]}]", "--trials", "2"]
    real, calls = gsmtune.evaluate.run_eval, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("stopped")
        return real(*args, **kwargs)

    monkeypatch.setattr(gsmtune.evaluate, "run_eval", second_fails)
    with pytest.raises(RuntimeError, match="stopped"):
        main(cmd)
    monkeypatch.setattr(gsmtune.evaluate, "run_eval", real)
    assert main(cmd) == 0
    states = [(t.state.name, t.params["training.learning_rate"]) for t in optuna.load_study(
        study_name="gsmtune", storage=f"sqlite:///{out / 'sweep.db'}").trials]
    first, failed = states[0][1], states[1][1]
    assert states == [("COMPLETE", first), ("FAIL", failed), ("COMPLETE", failed)]

    study = optuna.load_study(study_name="gsmtune", storage=f"sqlite:///{out / 'sweep.db'}")
    study.enqueue_trial({"training.learning_rate": failed})
    study.ask({"training.learning_rate": optuna.distributions.CategoricalDistribution([1.0e-3, 1.0e-2])})  # killed
    assert main([*cmd[:-1], "3"]) == 2  # a grid of two: a third point is refused
    assert main(cmd) == 0  # two points finished: the killed duplicate is marked failed, nothing reruns
