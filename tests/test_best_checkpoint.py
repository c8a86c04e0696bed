"""BestCheckpoint warns only when a validation ran and did not log its monitor."""

import warnings
from types import SimpleNamespace

import pytest

from msdetr.lit.callbacks import BestCheckpoint


def _trainer(metrics: dict, sanity_checking: bool = False):
    return SimpleNamespace(callback_metrics=metrics, sanity_checking=sanity_checking)


def test_no_warning_before_the_first_validation(tmp_path):
    # check_val_every_n_epoch > 1: the first epoch ends with no val/AP yet, which is no fault.
    best = BestCheckpoint(dirpath=tmp_path, monitor="val/AP", mode="max")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        best.on_train_epoch_end(_trainer({}), None)
    assert list(tmp_path.iterdir()) == []


def test_a_validation_without_the_monitor_warns_once(tmp_path):
    best = BestCheckpoint(dirpath=tmp_path, monitor="val/AP", mode="max")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        best.on_validation_end(_trainer({}, sanity_checking=True), None)  # sanity check: silent
    with pytest.warns(UserWarning, match=r"no 'val/AP' this validation"):
        best.on_validation_end(_trainer({}), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        best.on_validation_end(_trainer({}), None)  # said once per run
    assert list(tmp_path.iterdir()) == []
