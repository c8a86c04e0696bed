"""A sweep run with hparams_search=optuna: what it searched (multirun.yaml's sweeper params), its
trials ranked by `optimized_metric`, optimization_results.yaml, and Optuna's parameter importances
over a study rebuilt from the completed trials."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msdetr.report.jobs import Job, read_yaml, select, split_override


@dataclass
class OptunaSearch:
    """What a sweep run with hparams_search=optuna searched and found."""

    direction: str  # maximize or minimize
    metric: str  # optimized_metric
    params: dict[str, str]  # searched key -> its Hydra sweep expression, e.g. choice(1.0, 2.0)
    # the completed jobs with a value: (job, value, {key: value parsed}), best first
    trials: list[tuple[Job, float, dict[str, Any]]] = field(default_factory=list)
    failed: list[Job] = field(default_factory=list)  # the jobs that gave Optuna no value
    best: dict | None = None  # optimization_results.yaml
    importances: dict[str, float] | None = None
    note: str = ""  # how the importances were computed, or why there are none


def _parse_override(key: str, value: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"{key}={value}")


def optuna_distribution(key: str, expression: str):
    """The Optuna 2 distribution the Optuna sweeper samples `key` from for its `params`
    `expression` (interval: uniform, log-uniform with tag(log, ...), integer ones for integer
    bounds; range: integer or discrete uniform; choice or a shuffled range: categorical); None
    for a fixed value."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna import distributions as od

    override = _parse_override(key, expression)
    sweep = override.value()
    if isinstance(sweep, ChoiceSweep) or (isinstance(sweep, RangeSweep) and sweep.shuffle):
        return od.CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(sweep, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, sweep.step
        if start is None or stop is None:
            return None
        if any(isinstance(v, float) for v in (start, stop, step)):
            return od.DiscreteUniformDistribution(float(start), float(stop), float(step))
        return od.IntUniformDistribution(int(start), int(stop), step=int(step))
    if isinstance(sweep, IntervalSweep):
        low, high = sweep.start, sweep.end
        if low is None or high is None:
            return None
        integer = isinstance(low, int) and isinstance(high, int)
        if "log" in sweep.tags:
            return (
                od.IntLogUniformDistribution(int(low), int(high))
                if integer
                else od.LogUniformDistribution(float(low), float(high))
            )
        return (
            od.IntUniformDistribution(int(low), int(high))
            if integer
            else od.UniformDistribution(float(low), float(high))
        )
    return None


def _searched(params: Mapping[str, Any]) -> dict[str, str]:
    """The keys of the sweeper's `params` that are searched (a sweep expression), not fixed."""
    searched = {}
    for key, expression in params.items():
        try:
            if _parse_override(str(key), str(expression)).is_sweep_override():
                searched[str(key)] = str(expression)
        except Exception:  # not Hydra's override syntax: the sweeper would have refused it
            continue
    return searched


def read_optuna(sweep_dir: Path, jobs: list[Job]) -> OptunaSearch | None:
    """The Optuna search of the sweep (its multirun.yaml's sweeper is Optuna's, or it holds
    optimization_results.yaml), or None for another sweep."""
    from omegaconf import DictConfig, OmegaConf

    config = read_yaml(sweep_dir / "multirun.yaml")
    results_file = sweep_dir / "optimization_results.yaml"
    target = str(select(config, "hydra.sweeper._target_", ""))
    if "optuna" not in target.lower() and not results_file.is_file():
        return None
    node = select(config, "hydra.sweeper.params", {})
    params: Any = (
        OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else {}
    )
    direction = select(config, "hydra.sweeper.direction", "maximize")
    if not isinstance(direction, str):  # a list: one direction per objective
        directions = list(direction)
        direction = str(directions[0]) if len(directions) == 1 else "multi-objective"
    results = read_yaml(results_file) if results_file.is_file() else None
    best: Any = OmegaConf.to_container(results) if isinstance(results, DictConfig) else None
    search = OptunaSearch(
        direction=direction.lower(),
        metric=str(select(config, "optimized_metric", "val/AP")),
        params=_searched(params),
        best=best,
    )
    for job in jobs:
        value = job.final_value(search.metric) if job.usable else None
        if value is None or not math.isfinite(value):
            search.failed.append(job)
            continue
        mine = dict(map(split_override, job.overrides))
        chosen = {}
        for key in search.params:
            text = mine.get(key, mine.get(f"+{key}", mine.get(f"++{key}")))
            if text is not None:
                try:
                    chosen[key] = _parse_override(key, text).value()
                except Exception:
                    chosen[key] = text
        search.trials.append((job, value, chosen))
    search.trials.sort(key=lambda t: t[1], reverse=search.direction != "minimize")
    return search


def _in_distribution(value: Any, distribution) -> Any:
    """A trial's override value as the distribution holds it (a choice by equality or by its
    text); ValueError when it does not fit."""
    from optuna import distributions as od

    if isinstance(distribution, od.CategoricalDistribution):
        for choice in distribution.choices:
            if choice == value or str(choice) == str(value):
                return choice
        raise ValueError(value)
    if isinstance(distribution, (od.IntUniformDistribution, od.IntLogUniformDistribution)):
        number: float = int(value)
    else:
        number = float(value)
    if not distribution.low <= number <= distribution.high:
        raise ValueError(value)
    return number


def param_importances(search: OptunaSearch) -> None:
    """Optuna's parameter importances over a study rebuilt from the completed trials (fANOVA, its
    default; mean decrease in impurity when fANOVA fails with the installed scikit-learn), into
    `search.importances`, or the reason there are none into `search.note`."""
    if search.direction not in ("maximize", "minimize"):
        search.note = "Parameter importance is left out: the sweep has several objectives."
        return
    try:
        import optuna
    except ImportError:
        search.note = "Parameter importance needs optuna (pip install 'msdetr[sweep]')."
        return
    try:
        import sklearn  # noqa: F401 -- both of Optuna 2's importance evaluators fit its forests
    except ImportError:
        search.note = (
            "Parameter importance needs scikit-learn, which is not installed here "
            "(pip install 'msdetr[sweep]')."
        )
        return
    if not search.params:
        search.note = "Parameter importance is left out: multirun.yaml lists no searched params."
        return
    distributions = {}
    for key, expression in search.params.items():
        distribution = optuna_distribution(key, expression)
        if distribution is not None:
            distributions[key] = distribution
    trials, left_out = [], []
    for job, value, chosen in search.trials:
        try:
            params = {k: _in_distribution(chosen[k], d) for k, d in distributions.items()}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                trials.append(
                    optuna.trial.create_trial(
                        params=params, distributions=distributions, value=value
                    )
                )
        except (KeyError, ValueError):  # a job without a searched key, or a value outside it
            left_out.append(job.name)
    skipped = (
        f" Left out: job {', '.join(left_out)}, whose overrides do not fit the searched params."
        if left_out
        else ""
    )
    if len(trials) < 2:
        search.note = (
            f"Parameter importance needs at least 2 completed trials with a value; the sweep has "
            f"{len(trials)}.{skipped}"
        )
        return
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(direction=search.direction)
            for trial in trials:
                study.add_trial(trial)
            how = f"Optuna's fANOVA over the {len(trials)} completed trials"
            try:
                found = optuna.importance.get_param_importances(
                    study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
                )
            except Exception as err:
                how = (
                    f"Optuna's mean decrease in impurity over the {len(trials)} completed trials "
                    f"(its fANOVA failed with this scikit-learn: {type(err).__name__})"
                )
                found = optuna.importance.get_param_importances(
                    study,
                    evaluator=optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0),
                )
    except Exception as err:
        search.note = (
            f"Optuna could not compute the parameter importances ({type(err).__name__}: "
            f"{err}).{skipped}"
        )
        return
    finally:
        optuna.logging.set_verbosity(verbosity)
    search.importances = {k: float(v) for k, v in found.items()}
    search.note = f"Parameter importance: {how}; they sum to 1.{skipped}"
