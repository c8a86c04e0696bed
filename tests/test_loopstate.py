"""The loop state of checkpoints written between an epoch's last step and its end (issue 20, item
0): the counters Lightning writes there, and what loopstate.settle_epoch_end makes of them."""

import copy

from msdetr.lit import loopstate


def _progress(**values):
    return {"total": dict(values), "current": dict(values)}


def _loops(epoch, batches, completed, val, val_last):
    """A fit loop `epoch` epochs in, its current epoch's `batches` steps processed (`completed` of
    them through on_train_batch_end), its validation progress `val`."""
    return {
        "fit_loop": {
            "epoch_progress": _progress(
                ready=epoch + 1, started=epoch + 1, processed=epoch, completed=epoch
            ),
            "epoch_loop.batch_progress": {
                **_progress(ready=batches, started=batches, processed=batches, completed=completed),
                "is_last_batch": batches == 4,
            },
            "epoch_loop.val_loop.batch_progress": {
                **_progress(ready=val, started=val, processed=val, completed=val),
                "is_last_batch": val_last,
            },
            "epoch_loop.state_dict": {"_batches_that_stepped": 4 * epoch + batches - 1},
        }
    }


def test_mid_epoch_states_are_left_as_lightning_wrote_them():
    loops = _loops(1, 2, 1, 0, False)
    before = copy.deepcopy(loops)
    assert loopstate.settle_epoch_end(loops, 4, validation_due=True) is None and loops == before
    # written in on_train_epoch_end: the epoch is already processed
    loops["fit_loop"]["epoch_progress"] = _progress(ready=1, started=1, processed=1, completed=0)
    assert loopstate.settle_epoch_end(loops, 4, validation_due=True) is None


def test_the_last_step_with_validation_due_resumes_into_that_validation():
    # the end of the last step: on_train_batch_end has not counted it
    loops = _loops(0, 4, 3, 0, False)
    assert loopstate.settle_epoch_end(loops, 4, validation_due=True) == loopstate.VALIDATION_PENDING
    fit = loops["fit_loop"]
    assert fit["epoch_loop.batch_progress"]["current"]["completed"] == 4
    assert fit["epoch_loop.val_loop.batch_progress"]["current"] == dict(
        ready=1, started=1, processed=0, completed=0
    )
    assert fit["epoch_progress"]["current"]["processed"] == 0  # the epoch ends after the validation
    # the same after the validation itself (saved in on_validation_end): it runs again
    loops = _loops(1, 4, 4, 3, True)
    assert loopstate.settle_epoch_end(loops, 4, validation_due=True) == loopstate.VALIDATION_PENDING


def test_the_last_step_without_validation_resumes_into_the_next_epoch():
    loops = _loops(2, 4, 3, 0, False)
    assert loopstate.settle_epoch_end(loops, 4, validation_due=False) == loopstate.EPOCH_DONE
    fit = loops["fit_loop"]
    assert (
        fit["epoch_progress"]["total"]["processed"] == 3
        and fit["epoch_progress"]["current"]["completed"] == 2
    )
    assert fit["epoch_loop.state_dict"]["_batches_that_stepped"] == 12  # as in on_train_epoch_end


def test_not_a_fit_checkpoint():
    assert loopstate.settle_epoch_end({}, 4, validation_due=True) is None
    assert loopstate.settle_epoch_end({"fit_loop": {}}, 4, validation_due=True) is None
