"""Known bad input ends a run in one sentence: the entry scripts run inside `one_sentence()`, which
turns the errors msdetr raises about data, configs, checkpoints, disks and diverged training into a
Hydra CompactHydraException, printed as its message alone (HYDRA_FULL_ERROR=1 still shows the
traceback). Imports nothing heavy: the exception classes are looked up when one is raised."""
from __future__ import annotations

import contextlib

from hydra.errors import CompactHydraException


class RunError(CompactHydraException):
    """One sentence about what stopped the run and how to fix it."""


def _known() -> tuple[type[BaseException], ...]:
    from .data.coco import UnreadableImageError
    from .files import DiskFullError
    from .runner import IncompleteRunError

    return ValueError, FileNotFoundError, FloatingPointError, UnreadableImageError, DiskFullError, IncompleteRunError


@contextlib.contextmanager
def one_sentence():
    try:
        yield
    except CompactHydraException:
        raise
    except Exception as exc:
        if isinstance(exc, _known()):
            raise RunError(str(exc)) from exc
        raise
