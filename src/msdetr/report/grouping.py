"""How the report groups the jobs: its options (the command line's flags or the report_* keys), the
configurations (jobs that differ only in their seed, or in what --group-by leaves out) and the
baseline the others are compared with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from msdetr.report.jobs import Job, differing_overrides, override_key, split_override

BANDS = {"minmax": "min to max over the seeds", "std": "mean ± 1 sample standard deviation"}
TOP_TRIALS = 5


class ReportOptionError(ValueError):
    """An option of the report (a flag, or a report_* key of conf/train.yaml) that cannot be used:
    a malformed value, or a baseline or --group-by key the sweep does not have."""


def _split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside brackets and quotes ("a=1,b=[2,3]": "a=1", "b=[2,3]")."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[({":
            depth += 1
        elif char in "])}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _items(value: Any) -> list[str]:
    """A command-line or config value as a list of strings: None is empty, a string is split at its
    commas, a list gives its items (each split), a mapping its KEY=VALUE pairs."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None:
        return []
    if isinstance(value, str):
        return _split_top_level(value)
    if isinstance(value, Mapping):
        return [f"{k}={v}" for k, v in value.items()]
    if isinstance(value, Sequence):
        return [item for v in value for item in _items(v)]
    return [str(value)]


@dataclass(frozen=True)
class Options:
    """How the report groups and compares the jobs (the command line's flags, or conf/train.yaml's
    report_* keys for the Hydra callback)."""

    # the override keys whose values only repeat a configuration (`seed`)
    seed_keys: tuple[str, ...] = ("seed",)
    # when set, a configuration is exactly these keys' values
    group_by: tuple[str, ...] = ()
    # (key, value) pairs naming the baseline configuration
    baseline: tuple[tuple[str, str], ...] = ()
    band: str = "minmax"
    top: int = TOP_TRIALS
    # errors name the command line's flags (--baseline), else conf/train.yaml's keys
    cli: bool = True

    def name(self, option: str) -> str:
        """The option as the user gave it: --group-by, or report_group_by."""
        return f"--{option.replace('_', '-')}" if self.cli else f"report_{option}"

    @classmethod
    def parse(
        cls,
        seed_keys: Any = "seed",
        group_by: Any = None,
        baseline: Any = None,
        band: Any = "minmax",
        top: Any = TOP_TRIALS,
        cli: bool = True,
    ) -> Options:
        """The options from command-line strings or config values (a string with commas, a list, a
        mapping for the baseline); a malformed one is refused in one sentence
        (ReportOptionError)."""
        plain = cls(cli=cli)
        pairs = []
        for item in _items(baseline):
            key, sep, value = item.partition("=")
            if not sep or not override_key(key.strip()):
                raise ReportOptionError(
                    f"{plain.name('baseline')} takes KEY=VALUE overrides naming one configuration "
                    f"(e.g. matcher=hungarian); '{item}' has no '='."
                )
            pairs.append((override_key(key.strip()), value.strip()))
        if band not in BANDS:
            raise ReportOptionError(
                f"{plain.name('band')}={band!r} is not a band; use minmax (min to max over the "
                "seeds) or std (mean ± 1 standard deviation)."
            )
        whole = isinstance(top, (int, str)) and not isinstance(top, bool)
        if not whole or not str(top).strip().isdigit() or int(top) < 1:
            raise ReportOptionError(
                f"{plain.name('top')}={top!r} is not a number of trials; give a whole number >= 1."
            )
        return cls(
            seed_keys=tuple(override_key(k) for k in _items(seed_keys)),
            group_by=tuple(override_key(k) for k in _items(group_by)),
            baseline=tuple(pairs),
            band=str(band),
            top=int(top),
            cli=cli,
        )


def _bare_key(override: str) -> str:
    """The key an override sets, without Hydra's prefixes (`seed` for ++seed=1)."""
    return override_key(split_override(override)[0])


@dataclass
class Configuration:
    """Jobs that differ only in their repetition (seed) overrides."""

    # the overrides that define it (its first job's, the repetition ones left out)
    overrides: list[str]
    jobs: list[Job] = field(default_factory=list)
    # the overrides that differ between the configurations ("defaults" where it sets none of them)
    label: str = ""

    @property
    def usable(self) -> list[Job]:
        return [j for j in self.jobs if j.usable]

    @property
    def excluded(self) -> list[Job]:
        return [j for j in self.jobs if not j.usable]

    def values(self, metric: str) -> list[tuple[tuple[str, ...], float]]:
        """(repetition, final value) of `metric` (a FINAL_METRICS / MASK_METRICS name) for each
        usable job that logged it."""
        return [(j.repeat, j.final[metric]) for j in self.usable if metric in j.final]

    def matches(self, pairs: Sequence[tuple[str, str]]) -> bool:
        mine = {override_key(k): v for k, v in map(split_override, self.overrides)}
        return all(mine.get(k) == v for k, v in pairs)


def configurations(jobs: list[Job], options: Options) -> list[Configuration]:
    """The jobs grouped into configurations, in the order of their first jobs: jobs whose
    overrides differ only in `options.seed_keys`, or, with `options.group_by`, jobs with the same
    values of those keys. Sets each job's `repeat` and each configuration's label. A --group-by
    key no job overrides is refused (ReportOptionError)."""
    if options.group_by:
        present = list(dict.fromkeys(_bare_key(o) for j in jobs for o in j.overrides))
        missing = [k for k in options.group_by if k not in present]
        if missing:
            raise ReportOptionError(
                f"{options.name('group_by')} {','.join(missing)}: no job of the sweep overrides "
                f"{'this key' if len(missing) == 1 else 'these keys'}; the keys its jobs override "
                f"are {', '.join(present) or 'none'}."
            )

    def defines(override: str) -> bool:
        """Whether the override is part of its job's configuration, not a repetition."""
        if options.group_by:
            return _bare_key(override) in options.group_by
        return _bare_key(override) not in options.seed_keys

    found: dict[frozenset, Configuration] = {}
    for job in jobs:
        own = [o for o in job.overrides if defines(o)]
        job.repeat = tuple(o for o in job.overrides if not defines(o))
        identity = frozenset((override_key(k), v) for k, v in map(split_override, own))
        found.setdefault(identity, Configuration(own)).jobs.append(job)
    result = list(found.values())
    labels = differing_overrides([c.overrides for c in result])
    for config, label in zip(result, labels):
        config.label = label or ("all jobs" if len(result) == 1 else "defaults")
    return result


def find_baseline(configs: list[Configuration], options: Options) -> Configuration | None:
    """The configuration `options.baseline` names (None when it names none); a baseline that
    matches no configuration, or several, is refused in one sentence (ReportOptionError)."""
    if not options.baseline:
        return None
    matched = [c for c in configs if c.matches(options.baseline)]
    if len(matched) == 1:
        return matched[0]
    given = ",".join(f"{k}={v}" for k, v in options.baseline)
    available = "; ".join(c.label for c in configs)
    if not matched:
        raise ReportOptionError(
            f"{options.name('baseline')} {given} matches no configuration of the sweep; its "
            f"configurations are: {available}."
        )
    raise ReportOptionError(
        f"{options.name('baseline')} {given} matches {len(matched)} configurations "
        f"({'; '.join(c.label for c in matched)}); add KEY=VALUE pairs to name one of: "
        f"{available}."
    )
