"""The report of a Hydra multirun sweep: python -m msdetr.report <sweep dir> [--out DIR]
    [--metric val/AP] [--seed-keys seed] [--group-by KEY,...] [--baseline KEY=VALUE]
    [--band minmax|std] [--top 5] [--no-wandb]

Reads every job directory of the sweep (`<sweep dir>/<job>/` with `.hydra/overrides.yaml`), its CSV
metrics (`csv/version_0/metrics.csv`) and the `run_summary.json` that `msdetr.run.train` writes
when a run ends, and writes into `<sweep dir>/report/` (or --out):

- configurations: jobs whose overrides differ only in the seed keys (`--seed-keys`, default `seed`)
  are the seeds of one configuration; with `--group-by KEY,...` a configuration is the values of
  those keys alone, any other override a repetition. Only completed jobs count; the others are
  listed with their status.
- `report.md` and `configs.csv`: per configuration, the mean ± sample standard deviation and n of
  the final AP/AP50/AP75/APs/APm/APl/AR100 (and the mask metrics when a job logged them), mean
  images/s and peak memory; with `--baseline KEY=VALUE`, each configuration's difference of means
  from the baseline's with a bootstrap 95% interval (paired by seed when both ran the same seeds);
- `report.md` ("Jobs") and `report.csv`: one row per job: the overrides that differ between jobs,
  status, the final metrics, epochs, wall time, training images/s (the median of the `throughput`
  callback's windows) and peak memory (CUDA max allocated; CPU peak resident set);
- `train_loss.png` (training loss per step, each job's running mean) and `val_AP.png` (the --metric
  per epoch): per configuration the mean over its seeds and a band (min to max, or `--band std`);
- for an Optuna sweep (hparams_search=optuna: the sweep's `multirun.yaml` and
  `optimization_results.yaml`), the top trials by `optimized_metric` and Optuna's parameter
  importances (`param_importance.png`; needs scikit-learn);
- when the jobs logged to W&B, both tables as `wandb.Table`s (and the figures) in a new W&B run of
  the sweep's group (WANDB_MODE=offline works).

`report=true` on a `python train.py -m ...` sweep writes the report when the sweep ends
(`SweepReport`, a Hydra callback configured in conf/train.yaml, with the options as `report_*`
keys).

The package: `jobs` (each job directory, labels, report.csv), `grouping` (the options, the
configurations, the baseline), `stats` (mean/std/n, the bootstrap comparison, configs.csv),
`figures`, `optuna_search`, `markdown_text` (report.md) and `wandb_table`; this module ties them
together (`write_report`, the `SweepReport` callback, the command line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from msdetr.report.figures import Drawing, plot_importance, plot_loss, plot_metric
from msdetr.report.grouping import (
    BANDS,
    TOP_TRIALS,
    Configuration,
    Options,
    ReportOptionError,
    configurations,
    find_baseline,
)
from msdetr.report.jobs import (
    COLUMNS,
    FINAL_METRICS,
    MASK_METRICS,
    STATUS_NOTES,
    SUMMARY_FILE,
    USABLE,
    Job,
    NotASweepError,
    common_overrides,
    find_jobs,
    job_columns,
    label_jobs,
    logged_metrics,
    read_job,
    read_metrics,
    table,
    write_csv,
)
from msdetr.report.markdown_text import READABLE_CONFIGURATIONS, markdown
from msdetr.report.optuna_search import (
    OptunaSearch,
    optuna_distribution,
    param_importances,
    read_optuna,
)
from msdetr.report.stats import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    Difference,
    Summary,
    bootstrap_difference,
    compare,
    configuration_table,
    summarize,
)
from msdetr.report.wandb_table import WANDB_GROUP_MAX, log_to_wandb

__all__ = [
    "BANDS",
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "COLUMNS",
    "FINAL_METRICS",
    "MASK_METRICS",
    "READABLE_CONFIGURATIONS",
    "STATUS_NOTES",
    "SUMMARY_FILE",
    "TOP_TRIALS",
    "USABLE",
    "WANDB_GROUP_MAX",
    "Configuration",
    "Difference",
    "Drawing",
    "Job",
    "NotASweepError",
    "OptunaSearch",
    "Options",
    "ReportOptionError",
    "Summary",
    "SweepReport",
    "bootstrap_difference",
    "common_overrides",
    "compare",
    "configuration_table",
    "configurations",
    "find_baseline",
    "find_jobs",
    "job_columns",
    "label_jobs",
    "log_to_wandb",
    "logged_metrics",
    "main",
    "markdown",
    "optuna_distribution",
    "param_importances",
    "plot_importance",
    "plot_loss",
    "plot_metric",
    "read_job",
    "read_metrics",
    "read_optuna",
    "summarize",
    "table",
    "write_csv",
    "write_report",
]


def write_report(
    sweep_dir: str | Path,
    out: str | Path | None = None,
    metric: str = "val/AP",
    wandb_group: str | None = None,
    use_wandb: bool = True,
    options: Options | None = None,
) -> dict[str, Path | str | None]:
    """Write the sweep's report (see the package's docstring) into `out` (default `<sweep
    dir>/report`); the paths written, by kind. Raises NotASweepError (one sentence) for a directory
    without jobs, ReportOptionError (one sentence) for a baseline or --group-by the sweep does not
    have."""
    options = options or Options()
    sweep_dir = Path(sweep_dir)
    jobs = [read_job(p) for p in find_jobs(sweep_dir)]
    label_jobs(jobs)
    configs = configurations(jobs, options)
    baseline = find_baseline(configs, options)
    metrics = logged_metrics(jobs)
    differences = compare(configs, baseline, metrics) if baseline is not None else {}
    search = read_optuna(sweep_dir, jobs)
    if search is not None:
        param_importances(search)

    out = Path(out) if out is not None else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    job_rows = table(jobs, metrics)
    config_columns, config_rows = configuration_table(configs, metrics, baseline, differences)
    title = "/".join(sweep_dir.resolve().parts[-2:])
    drawings = [
        plot_loss(configs, out / "train_loss.png", title, options.band),
        plot_metric(configs, metric, out / f"{metric.replace('/', '_')}.png", title, options.band),
    ]
    importance_figure = (
        plot_importance(search.importances, out / "param_importance.png", title)
        if search is not None and search.importances
        else None
    )
    write_csv(job_rows, out / "report.csv", job_columns(metrics))
    write_csv(config_rows, out / "configs.csv", config_columns)
    (out / "report.md").write_text(
        markdown(
            sweep_dir,
            jobs,
            job_rows,
            configs,
            config_rows,
            metrics,
            options,
            baseline,
            differences,
            drawings,
            search,
            importance_figure,
        )
    )
    figures = [d.path for d in drawings] + ([importance_figure] if importance_figure else [])
    written: dict[str, Path | str | None] = {
        "markdown": out / "report.md",
        "csv": out / "report.csv",
        "configs_csv": out / "configs.csv",
        "loss_figure": drawings[0].path,
        "metric_figure": drawings[1].path,
        "importance_figure": importance_figure,
        "wandb": None,
    }
    if use_wandb:
        try:
            written["wandb"] = log_to_wandb(
                jobs,
                job_rows,
                figures,
                out,
                sweep_dir,
                metric,
                wandb_group,
                columns=job_columns(metrics),
                configurations=(config_columns, config_rows),
            )
        except Exception as err:  # not logged in, no network: the files above stand
            print(
                f"msdetr.report: the W&B table was not logged ({type(err).__name__}: {err}); the "
                f"report's files are in {out}.",
                file=sys.stderr,
            )
    return written


class SweepReport(Callback):
    """Hydra callback: writes the report of a multirun sweep when it ends (conf/train.yaml,
    `report=true`, its options as report_seed_keys, report_group_by, report_baseline, report_band
    and report_top). With `enabled` false (the default `report: false`) it does nothing."""

    def __init__(
        self,
        enabled: bool = True,
        out: str | None = None,
        metric: str | None = None,
        seed_keys: Any = "seed",
        group_by: Any = None,
        baseline: Any = None,
        band: str = "minmax",
        top: int = TOP_TRIALS,
    ):
        self.enabled = bool(enabled)
        self.out = out
        self.metric = metric
        self.given = {
            "seed_keys": seed_keys,
            "group_by": group_by,
            "baseline": baseline,
            "band": band,
            "top": top,
        }

    @property
    def options(self) -> Options:
        return Options.parse(**self.given, cli=False)

    def on_multirun_start(self, config, **kwargs) -> None:
        if self.enabled:  # a malformed report_* key stops the sweep before its first job
            Options.parse(**self.given, cli=False)

    def on_multirun_end(self, config, **kwargs) -> None:
        if not self.enabled:
            return
        from omegaconf import OmegaConf

        sweep = str(config.hydra.sweep.dir)
        metric = self.metric or config.get("optimized_metric") or "val/AP"
        # the group the jobs' W&B runs got (msdetr.lit.loggers.wandb_group), when they used W&B
        try:
            group = (
                OmegaConf.select(config, "logger.wandb.group", default=None)
                or sweep[-WANDB_GROUP_MAX:]
            )
        except Exception:
            group = None
        try:
            written = write_report(
                sweep, self.out, metric=metric, wandb_group=group, options=self.options
            )
        except ReportOptionError as err:
            print(
                f"sweep report: not written: {err} (python -m msdetr.report {sweep} writes it "
                "with other options.)",
                file=sys.stderr,
                flush=True,
            )
            return
        print(
            f"sweep report: {written['markdown']} (tables, "
            f"figures{', W&B run' if written['wandb'] else ''})",
            flush=True,
        )

    def on_run_end(self, config, **kwargs) -> None:
        if self.enabled:
            print(
                "report=true: a single run has no sweep to report; it acts at the end of a "
                "multirun (python train.py -m ...).",
                file=sys.stderr,
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m msdetr.report",
        description=(
            "Tables (Markdown, CSV), figures and W&B tables of a Hydra multirun sweep (python "
            "train.py -m ...): per configuration over its seeds, and per job."
        ),
    )
    parser.add_argument(
        "sweep_dir", help="the sweep's directory (multirun/<date>/<time>, or hydra.sweep.dir)"
    )
    parser.add_argument("--out", default=None, help="where to write (default: <sweep_dir>/report)")
    parser.add_argument(
        "--metric",
        default="val/AP",
        help="the validation metric plotted per epoch (default val/AP)",
    )
    parser.add_argument(
        "--seed-keys",
        default="seed",
        metavar="KEY[,KEY]",
        help="the override keys that only repeat a configuration (default: seed)",
    )
    parser.add_argument(
        "--group-by",
        default=None,
        metavar="KEY[,KEY]",
        help="a configuration is exactly these keys' values; any other override is a repetition",
    )
    parser.add_argument(
        "--baseline",
        action="append",
        default=None,
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="the configuration the others are compared with (repeatable), e.g. matcher=hungarian",
    )
    parser.add_argument(
        "--band",
        default="minmax",
        choices=sorted(BANDS),
        help="the figures' band over the seeds: minmax (default) or std (mean ± 1 std)",
    )
    parser.add_argument(
        "--top", type=int, default=TOP_TRIALS, help="the Optuna trials listed (default 5)"
    )
    parser.add_argument("--no-wandb", action="store_true", help="do not log the tables to W&B")
    args = parser.parse_args(argv)
    try:
        options = Options.parse(
            seed_keys=args.seed_keys,
            group_by=args.group_by,
            baseline=args.baseline,
            band=args.band,
            top=args.top,
        )
        written = write_report(
            args.sweep_dir,
            args.out,
            metric=args.metric,
            use_wandb=not args.no_wandb,
            options=options,
        )
    except (NotASweepError, ReportOptionError) as err:
        print(f"msdetr.report: {err}", file=sys.stderr)
        return 2
    for kind, path in written.items():
        if path is not None:
            print(f"{kind}: {path}")
    return 0
