"""One loop state for every checkpoint written at the end of an epoch.

Lightning writes the fit loop's progress counters as they stand in the hook that saves. Between
the end of an epoch's last training step and the fit loop counting that epoch (just before
`on_train_epoch_end`) they are in a state Lightning's own resume logic reads wrongly: a checkpoint
taken there (a signal at the last step, an every-N-steps checkpoint that lands on it, a save during
the epoch-end validation) resumed as "the epoch is done" *and* counted it a second time, so the
next epoch was skipped and the run ended with status 0 (issue 20, item 0).

`settle_epoch_end` rewrites such a checkpoint's counters, at save time, into one of the two states
Lightning resumes correctly:
- validation is due this epoch: "training done, validation started" (Lightning's mid-validation
  state): the resumed run runs the epoch's validation again, then the epoch-end hooks (the latest
  and best checkpoints), then the next epoch;
- no validation this epoch: "epoch processed" (what a checkpoint written in `on_train_epoch_end`
  holds): the resumed run starts the next epoch.
Every other checkpoint (mid-epoch, or written in `on_train_epoch_end`) is left as Lightning wrote
it.
"""

from __future__ import annotations

# What `settle_epoch_end` did, stored in the checkpoint under this key.
KEY = "msdetr_loop_state"
VALIDATION_PENDING = "validation_pending"
EPOCH_DONE = "epoch_done"


def _set(progress: dict, **values: int) -> None:
    for part in ("total", "current"):
        progress[part].update(values)


def settle_epoch_end(loops: dict, num_training_batches: float, validation_due: bool) -> str | None:
    """Rewrite `loops` (a checkpoint's "loops") in place if it was taken after the epoch's last
    training step and before the fit loop counted the epoch; return what it became (or None)."""
    fit = (loops or {}).get("fit_loop")
    if not fit or "epoch_progress" not in fit or "epoch_loop.batch_progress" not in fit:
        return None
    epochs = fit["epoch_progress"]["current"]
    batches = fit["epoch_loop.batch_progress"]
    inside_epoch = (
        epochs["processed"] == epochs["completed"] and epochs["started"] == epochs["processed"] + 1
    )
    trained = batches["current"]["processed"]
    if not inside_epoch or trained < num_training_batches:
        return None  # mid-epoch, or outside an epoch's run: Lightning's own state resumes right
    # The last step ended (its on_train_batch_end may not have): count it as completed.
    for part in ("total", "current"):
        batches[part]["completed"] = batches[part]["processed"]
    batches["is_last_batch"] = True
    if validation_due:
        # Lightning's "restarted mid-validation": one validation batch started, none processed.
        val = fit["epoch_loop.val_loop.batch_progress"]
        _set(val, ready=1, started=1, processed=0, completed=0)
        val["is_last_batch"] = False
        return VALIDATION_PENDING
    for part in ("total", "current"):
        fit["epoch_progress"][part]["processed"] = fit["epoch_progress"][part]["completed"] + 1
    # Lightning counts this step for the loggers after the epoch's last batch; a state written in
    # on_train_epoch_end has it, one written at the step end does not yet.
    state = fit.setdefault("epoch_loop.state_dict", {})
    state["_batches_that_stepped"] = state.get("_batches_that_stepped", 0) + 1
    return EPOCH_DONE


def validation_due(trainer) -> bool:
    """Whether this epoch of `trainer`'s fit ends with a validation (per-epoch validation only)."""
    every = trainer.check_val_every_n_epoch
    if not trainer.enable_validation or every is None:
        return False
    return (trainer.current_epoch + 1) % every == 0
