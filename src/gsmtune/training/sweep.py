"""Hyper-parameter search with Optuna: each trial trains and scores on the validation split carved from train.

Trials are stored in SQLite inside the sweep folder, so an interrupted sweep resumes: finished trials are kept and
a trial cut off mid-way is rerun with the same parameters (its training resumes from its own checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from omegaconf import DictConfig

from gsmtune.config import load_config, to_yaml
from gsmtune.errors import GsmtuneError
from gsmtune.runs import write_atomic

KINDS = ("float", "int", "categorical")


def suggest(trial, space: list) -> dict:
    """Optuna suggestions for the config's `sweep.space` entries ({key, type, low, high, log} or {key, choices})."""
    params = {}
    for entry in space:
        key, kind = entry.get("key"), entry.get("type", "categorical" if "choices" in entry else None)
        if not key or kind not in KINDS:
            raise GsmtuneError(f"sweep.space entry {dict(entry)} needs 'key' and a 'type' of {', '.join(KINDS)}")
        if kind == "float":
            params[key] = trial.suggest_float(key, entry["low"], entry["high"], log=entry.get("log", False))
        elif kind == "int":
            params[key] = trial.suggest_int(key, entry["low"], entry["high"], log=entry.get("log", False))
        else:
            params[key] = trial.suggest_categorical(key, list(entry["choices"]))
    return params


def make_sampler(cfg: DictConfig, trials: int):
    """TPE searches; grid runs each combination of the entries' choices once, so the tuning budget is fixed up front."""
    import optuna

    if cfg.sweep.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed)
    grid = {}
    for entry in cfg.sweep.space:
        if "choices" not in entry:
            raise GsmtuneError(f"sweep.sampler=grid needs 'choices' in every sweep.space entry; {entry.get('key')} has none")
        grid[entry["key"]] = list(entry["choices"])
    size = math.prod(len(choices) for choices in grid.values())
    if trials > size:
        raise GsmtuneError(f"--trials {trials} is more than the grid's {size} combinations; lower it to {size}")
    return optuna.samplers.GridSampler(grid, seed=cfg.seed)


def _key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def rerun_cut_off(study) -> None:
    """Trials cut off last time (RUNNING after a kill, FAIL after a handled signal or an error) run again with their
    parameters, once, unless those parameters already finished or wait in the queue; their training resumes from the
    trial's own checkpoint."""
    from optuna.trial import TrialState

    settled = {_key(t.params) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    settled |= {_key(t.system_attrs.get("fixed_params", {}))
                for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL)):
        if t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL)
        if t.params and _key(t.params) not in settled:
            study.enqueue_trial(t.params)
            settled.add(_key(t.params))


def trial_dir(root: Path, params: dict) -> Path:
    """Named by its parameters, so a rerun of an interrupted trial finds its own checkpoints."""
    digest = hashlib.sha1(_key(params).encode()).hexdigest()[:10]
    return root / f"trial-{digest}"


def as_overrides(params: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in params.items()]


def run_sweep(config_path: str | Path, overrides: list[str], trials: int, storage: str | None = None) -> dict:
    """Run trials until `trials` have finished; write best.yaml (the config with the best parameters) and return them."""
    import optuna

    from gsmtune.evaluate import run_eval
    from gsmtune.training.driver import run_train

    cfg = load_config(config_path, overrides)
    if cfg.dataset.validation_size <= 0:
        raise GsmtuneError("a sweep scores trials on validation data: set dataset.validation_size > 0 (never test)")
    if not cfg.sweep.space:
        raise GsmtuneError("sweep.space is empty: list the keys to search (see configs/sweep_example.yaml)")
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(root / "sweep_config.yaml", to_yaml(cfg))
    url = storage or f"sqlite:///{root / 'sweep.db'}"
    study = optuna.create_study(study_name=cfg.sweep.study_name, storage=url, direction="maximize",
                                load_if_exists=True, sampler=make_sampler(cfg, trials))
    # through a plain sampler: the grid's own hook would stop the study on this tell, outside any optimize call
    rerun_cut_off(optuna.load_study(study_name=cfg.sweep.study_name, storage=url, sampler=optuna.samplers.RandomSampler()))

    def objective(trial) -> float:
        params = suggest(trial, cfg.sweep.space)
        out = trial_dir(root, params)
        trial.set_user_attr("run_dir", str(out))
        tcfg = load_config(config_path, [*overrides, *as_overrides(params), f"output_dir={out}",
                                         "dataset.eval_split=validation", "num_eval_samples=null"])
        model = run_train(tcfg, resume=True)
        return run_eval(tcfg, resume=True, model_path=str(model))["accuracy"]

    def finished() -> int:
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        # a grid counts its points: a point evaluated twice (the grid re-evaluates once exhausted) is one
        return len({_key(t.params) for t in complete}) if cfg.sweep.sampler == "grid" else len(complete)

    while finished() < trials:
        study.optimize(objective, n_trials=1)
    best = study.best_trial
    best_cfg: DictConfig = load_config(config_path, [*overrides, *as_overrides(best.params),
                                                     f"output_dir={root / 'best_run'}"])
    write_atomic(root / "best.yaml", to_yaml(best_cfg))
    summary = {"best_value": best.value, "best_params": best.params, "best_trial_dir": best.user_attrs.get("run_dir"),
               "trials": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params}
                          for t in study.get_trials(deepcopy=False)]}
    write_atomic(root / "sweep_results.json", json.dumps(summary, indent=2) + "\n")
    return summary
