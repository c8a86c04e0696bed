"""Issue 20, item 3: faults a long run meets end in one sentence, with nothing the user made
lost."""

import errno
import json
import os
import resource
import signal
import subprocess

import pytest
import torch

from helpers.runs import SMALL, train
from msdetr.data.synthetic import write_synthetic_coco
from msdetr.files import DiskFullError, atomic_write


def _synthetic(tmp_path):
    """The synthetic set the tiny runs use (data.synthetic_train=8, data.synthetic_val=2), written
    now."""
    root = tmp_path / "data" / "synthetic"
    write_synthetic_coco(root, num_train=8, num_val=2)
    return root


@pytest.mark.slow
def test_validation_without_boxes_finishes(tmp_path):
    """The README promises a warning: the best checkpoint steps aside, latest carries on, status
    0."""
    root = _synthetic(tmp_path)
    data = json.loads((root / "annotations" / "instances_val.json").read_text())
    data["annotations"] = []
    (tmp_path / "val_no_boxes.json").write_text(json.dumps(data))
    run = train(
        tmp_path,
        tmp_path / "run",
        "schedule.epochs=1",
        f"+data.val_ann={tmp_path / 'val_no_boxes.json'}",
        base=SMALL,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "no 'val/AP' this validation" in run.stderr
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest.ckpt").is_file() and not list(checkpoints.glob("best-*"))


def test_atomic_write_on_a_full_disk_removes_its_temporary_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "latest.ckpt"
    path.write_bytes(b"the previous checkpoint")

    def fill(tmp):
        tmp.write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(
        DiskFullError,
        match=r"could not write '.*latest.ckpt': the disk is full \(it needed about "
        r"95 MB, .* MB are free there\); the partial file was removed",
    ):
        atomic_write(path, fill, size_hint=100_000_000)
    assert path.read_bytes() == b"the previous checkpoint" and os.listdir(tmp_path) == [
        "latest.ckpt"
    ]


@pytest.fixture()
def small_disk(tmp_path):
    """A 200 MiB tmpfs (one checkpoint of the tiny run fits, two do not); skipped where mounting is
    not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_tmpfs_keeps_the_previous_checkpoint(tmp_path, small_disk):
    """A real ENOSPC: the latest checkpoint fits on the disk, the best one written after it does
    not."""
    _synthetic(tmp_path)
    run_dir = small_disk / "run"
    run = train(tmp_path, run_dir, "schedule.epochs=1", base=SMALL)
    assert run.returncode != 0
    assert "best-epoch000" in run.stderr and "': the disk is full (it needed about " in run.stderr
    assert (
        "the partial file was removed and the previous" in run.stderr
        and "Traceback" not in run.stderr
    )
    checkpoints = run_dir / "checkpoints"
    assert not list(checkpoints.glob(".*tmp"))
    # intact
    latest = torch.load(checkpoints / "latest.ckpt", map_location="cpu", weights_only=True)
    assert latest["global_step"] == 4


def _file_size_limit(limit: int):
    def apply():
        # Writing past RLIMIT_FSIZE raises SIGXFSZ, which kills by default: ignored, the write fails
        # with EFBIG.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_a_run_out_of_disk_stops_in_one_sentence_with_no_temporary(tmp_path):
    """The disk fills up at the first checkpoint, simulated with RLIMIT_FSIZE (no tmpfs can be
    mounted here): one sentence naming the file and what it needed, no temporary left, non-zero
    status."""
    _synthetic(tmp_path)
    run = train(
        tmp_path,
        tmp_path / "run",
        "schedule.epochs=1",
        base=SMALL,
        preexec_fn=_file_size_limit(8 * 2**20),
    )
    assert run.returncode != 0
    assert (
        "could not write '" in run.stderr
        and "latest.ckpt': the file size limit (ulimit -f) was reached" in run.stderr
    )
    assert "Traceback" not in run.stderr
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not list(checkpoints.glob(".*tmp")) and not list(checkpoints.glob("*.ckpt"))
    assert json.loads((tmp_path / "run" / "run_summary.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_a_decode_failure_mid_epoch_saves_the_work_first(tmp_path, whole):
    """Without skip_bad_images: the steps done are saved, the run stops non-zero naming the file and
    data.verify_images=full; once the file is fixed, rerunning the command continues exactly."""
    from helpers.runs import MS_DETR, losses

    root = _synthetic(tmp_path)
    originals = {p.name: p.read_bytes() for p in (root / "train").iterdir()}

    run_dir = tmp_path / "run"
    cut = [
        "+callbacks.cut._target_=helpers.signals.TruncateImagesAtStep",
        "+callbacks.cut.step=2",
        f"+callbacks.cut.folder={root / 'train'}",
    ]
    broken = train(tmp_path, run_dir, *cut, base=MS_DETR)
    assert broken.returncode != 0
    assert (
        f"image '{root / 'train'}" in broken.stderr and "data.verify_images=full" in broken.stderr
    )
    assert "Traceback" not in broken.stderr
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2  # the steps done before the failed read

    for name, data in originals.items():  # the files fixed
        (root / "train" / name).write_bytes(data)
    resumed = train(tmp_path, run_dir, base=MS_DETR)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(run_dir) == whole[0]


@pytest.mark.slow
def test_skip_bad_images_keeps_going_and_lists_the_files(tmp_path):
    root = _synthetic(tmp_path)
    bad = sorted((root / "train").iterdir())[3]
    # the header intact: passes verify_images=header
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    run = train(
        tmp_path, tmp_path / "run", "schedule.epochs=1", "data.skip_bad_images=true", base=SMALL
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    assert (
        "1 training image(s) could not be read and were replaced by the next readable image each "
        f"time: {bad}" in out
    )


def _tensorboard_steps(run_dir, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}
    # reads the files as TensorBoard does (purges included)
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return [e.step for e in accumulator.Scalars(tag)]


@pytest.mark.slow
def test_after_a_hard_kill_tensorboard_shows_each_step_once(tmp_path):
    """The killed run logged steps past its last checkpoint; the resumed run purges them from
    TensorBoard (purge_step). (A resumed W&B run keeps its id: test_workflow.py. It is not combined
    with a SIGKILL here: the killed run's W&B service may hold the id for a while after the
        kill.)"""
    run_dir = tmp_path / "run"
    args = [
        "logger=[csv,tensorboard]",
        "callbacks.checkpoint.every_n_train_steps=2",
        "schedule.epochs=1",
    ]
    killed = train(
        tmp_path,
        run_dir,
        *args,
        "+callbacks.kill._target_=helpers.signals.SignalAtStep",
        "+callbacks.kill.step=3",
        "+callbacks.kill.when=batch_start",
        "+callbacks.kill.signal_name=SIGKILL",
        base=SMALL,
    )
    assert killed.returncode == -signal.SIGKILL
    # step 2 is past the checkpoint of step 2
    assert _tensorboard_steps(run_dir, "train/loss") == [0, 1, 2]
    resumed = train(tmp_path, run_dir, *args, base=SMALL)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _tensorboard_steps(run_dir, "train/loss") == [0, 1, 2, 3]  # each step once


@pytest.mark.parametrize("full_error", ["0", "1"])
def test_a_part_that_refuses_its_config_is_one_sentence(tmp_path, full_error):
    """Known bad input raised while Hydra builds the model comes out as its own sentence, without
    Hydra's traceback and InstantiationException wrapping; HYDRA_FULL_ERROR=1 still shows it all."""
    run = train(
        tmp_path,
        tmp_path / "run",
        "model.detector.backbone.name=resnet7",
        base=SMALL,
        env={"HYDRA_FULL_ERROR": full_error},
    )
    assert run.returncode != 0
    assert "unknown backbone 'resnet7'; choose one of" in run.stderr
    assert ("Traceback" in run.stderr) == (full_error == "1")
