"""Known bad input ends a run in one sentence: the entry scripts run inside `one_sentence()`, which
turns the errors msdetr raises about data, configs, checkpoints, disks and diverged training into a
Hydra CompactHydraException, printed as its message alone (HYDRA_FULL_ERROR=1 still shows the
traceback). Imports nothing heavy: the exception classes are looked up when one is raised."""

from __future__ import annotations

import contextlib

from hydra.errors import CompactHydraException, InstantiationException


class RunError(CompactHydraException):
    """One sentence about what stopped the run and how to fix it."""


def _known() -> tuple[type[BaseException], ...]:
    from .data.coco import UnreadableImageError
    from .files import DiskFullError
    from .run.resume import IncompleteRunError

    return (
        ValueError,
        FileNotFoundError,
        FloatingPointError,
        UnreadableImageError,
        DiskFullError,
        IncompleteRunError,
    )


def _sentence(text: str) -> str:
    """The error's own sentence; one re-raised from a DataLoader worker carries the worker's
    traceback ("Caught X in DataLoader worker process 0. Original Traceback ..."): its last line."""
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    name, sep, message = last.partition(": ")
    return message if sep and " " not in name else last


@contextlib.contextmanager
def one_sentence():
    try:
        yield
    except Exception as exc:
        if isinstance(exc, CompactHydraException) and not isinstance(exc, InstantiationException):
            raise
        cause = exc
        if isinstance(exc, InstantiationException) and exc.__cause__ is not None:
            cause = exc.__cause__  # a part that refused its config while Hydra built it
        if isinstance(cause, _known()):
            raise RunError(_sentence(str(cause))) from exc
        raise
