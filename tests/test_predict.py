"""predict.py: COCO results written as it goes, unreadable files named and skipped, a.jpg and a.png
    kept
apart, boxes inside their image, the checkpoint's resolution, and checkpoints from train.py,
`python -m msdetr fit` (LightningCLI) and one whose hyper_parameters hold the model config."""

import json
import logging
import shutil
import sys

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

import msdetr.predict as predict_module
from helpers import ROOT
from helpers.config import compose
from helpers.runs import LAUNCHER_VARS, config
from msdetr import visualize
from msdetr.__main__ import main as cli_main
from msdetr.predict import predict
from msdetr.run import train
from msdetr.run.build import build_module, plain_config

NAMES = {1: "rectangle", 2: "ellipse", 3: "triangle", 4: "cross"}


def _save_untrained(cfg, path):
    """A train.py-style checkpoint (config and class names inside) of an untrained tiny model whose
    boxes all span nearly the whole image, so that most of them stick out of it before clipping."""
    module = build_module(cfg)
    module.run_config = plain_config(cfg)
    module.category_names = dict(NAMES)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if name.startswith("bbox_embed.") and name.endswith("layers.2.weight"):
                p.zero_()
            elif name.startswith("bbox_embed.") and name.endswith("layers.2.bias"):
                p.copy_(torch.tensor([0.0, 0.0, 8.0, 8.0]))
    trainer = L.Trainer(
        logger=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = config(tmp, "data.num_classes=5", "data.eval_size=48", "data.max_size=72")
    return _save_untrained(cfg, tmp / "tiny.ckpt")


@pytest.fixture()
def folder(tmp_path):
    """a.jpg and a.png (different sizes), a text file named .jpg and a 16-bit PNG."""
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(inp / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (50, 30, 3), dtype=np.uint8)).save(inp / "a.png")
    (inp / "broken.jpg").write_text("not a picture")
    Image.fromarray(np.zeros((20, 20), dtype=np.uint16)).save(inp / "deep.png")
    return inp


def run_predict(ckpt, inp, out, *overrides, threshold=0.0):
    cfg = compose(
        f"ckpt_path='{ckpt}'",
        f"input='{inp}'",
        f"output_dir='{out}'",
        f"score_threshold={threshold}",
        "paths.output_dir=unused",
        "batch_size=2",
        *overrides,
        name="predict",
    )
    return predict(cfg)


@pytest.fixture()
def resolutions(monkeypatch):
    """The (eval_size, max_size) predict resizes with."""
    seen = []
    real = predict_module.eval_transforms

    def spy(size, max_size):
        seen.append((size, max_size))
        return real(size, max_size)

    monkeypatch.setattr(predict_module, "eval_transforms", spy)
    return seen


def test_predict_keeps_outputs_apart_skips_unreadable_files_and_clips(
    ckpt, folder, tmp_path, caplog, resolutions
):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="msdetr"):
        target = run_predict(ckpt, folder, out)
    dets = json.loads(target.read_text())
    assert {d["file_name"] for d in dets} == {"a.jpg", "a.png"}
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a.jpg.png", "a.png.png"]
    sizes = {"a.jpg": (60, 40), "a.png": (30, 50)}
    ids = {d["file_name"]: d["image_id"] for d in dets}
    assert ids["a.jpg"] != ids["a.png"]
    touching = 0
    for d in dets:
        w, h = sizes[d["file_name"]]
        x, y, bw, bh = d["bbox"]
        assert (
            x >= 0 and y >= 0 and bw >= 0 and bh >= 0 and x + bw <= w + 0.01 and y + bh <= h + 0.01
        )
        touching += x == 0 or y == 0 or abs(x + bw - w) < 0.01 or abs(y + bh - h) < 0.01
    assert touching == len(dets) == 20  # every box was clipped (10 per image)
    # One line per file, in order, written as it went: skipped files carry the reason.
    lines = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    assert [line["file_name"] for line in lines] == ["a.jpg", "a.png", "broken.jpg", "deep.png"]
    assert [len(line.get("detections", [])) for line in lines] == [10, 10, 0, 0]
    assert (lines[0]["width"], lines[0]["height"]) == (60, 40)
    assert [d for line in lines for d in line.get("detections", [])] == dets
    assert (
        lines[2]["error"]
        == f"image '{folder / 'broken.jpg'}' cannot be read (not an image file PIL can read)"
    )
    assert lines[3]["error"].startswith(
        f"image '{folder / 'deep.png'}' cannot be read (pixel mode 'I;16'"
    )
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        warned[0]
        == f"image '{folder / 'broken.jpg'}' cannot be read (not an image file PIL can read); "
        "skipped"
    )
    assert warned[1].startswith(f"image '{folder / 'deep.png'}' cannot be read (pixel mode 'I;16'")
    assert warned[2].startswith(
        f"2 of 4 file(s) could not be read and were skipped: image '{folder / 'broken.jpg'}'"
    )
    # The resolution the checkpoint's run evaluated at, unless given.
    assert resolutions == [(48, 72)]
    assert f"short side 48, long side at most 72 (the data config saved in '{ckpt}')" in caplog.text
    run_predict(ckpt, folder / "a.png", tmp_path / "one", "eval_size=32")
    assert resolutions[-1] == (32, 72)


def test_predict_writes_each_detections_mask_as_rle(folder, tmp_path, monkeypatch):
    cfg = config(
        tmp_path,
        "data.num_classes=5",
        "data.eval_size=48",
        "data.max_size=72",
        "+parts=mask_head",
        "matcher.mask_points=64",
    )
    ckpt = _save_untrained(cfg, tmp_path / "mask.ckpt")
    drawn = {}  # {image size (h, w): the detections the picture got}
    real = visualize.draw_detections

    def keep_then_draw(image, det, *args, **kwargs):
        drawn[tuple(image.shape[-2:])] = det
        return real(image, det, *args, **kwargs)

    monkeypatch.setattr(visualize, "draw_detections", keep_then_draw)
    out = tmp_path / "out"
    dets = json.loads(run_predict(ckpt, folder, out).read_text())
    lines = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    assert [d for line in lines for d in line.get("detections", [])] == dets and len(dets) == 20
    mixed = 0
    for line in lines[:2]:
        h, w = line["height"], line["width"]
        masks = drawn[(h, w)]["masks"]
        assert masks.dtype == torch.bool and masks.shape == (10, h, w)
        for det, mask in zip(line["detections"], masks):
            rle = det["segmentation"]
            assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
            decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            assert np.array_equal(decoded.astype(bool), mask.numpy())
            mixed += bool(mask.any()) and not bool(mask.all())
    assert mixed > 0  # the comparison saw masks that are neither empty nor full
    # predict.masks_to_rle itself, on a hand-made mask
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[0, 1, 1:3] = True
    (rle,) = predict_module.masks_to_rle(mask)
    assert rle["size"] == [3, 4] and predict_module.masks_to_rle(mask[:0]) == []
    assert mask_utils.area({"size": [3, 4], "counts": rle["counts"].encode()}) == 2


def test_predict_keeps_what_it_did_when_interrupted(ckpt, folder, tmp_path, monkeypatch):
    real = visualize.draw_detections
    calls = []

    def draw_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(visualize, "draw_detections", draw_then_fail)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_predict(ckpt, folder, out)
    (line,) = (out / "detections.jsonl").read_text().splitlines()
    assert json.loads(line)["file_name"] == "a.jpg" and len(json.loads(line)["detections"]) == 10
    assert [p.name for p in (out / "images").iterdir()] == ["a.jpg.png"]
    assert not (out / "detections.json").exists()


def test_predict_fails_when_nothing_is_readable(ckpt, folder, tmp_path):
    for name in ("a.jpg", "a.png"):
        (folder / name).unlink()
    with pytest.raises(
        ValueError,
        match=r"none of the 2 file\(s\) of input .* could be read as an image "
        r"\(image '.*broken\.jpg' cannot be read \(not an image file PIL can read\); "
        r"image '.*deep\.png'",
    ):
        run_predict(ckpt, folder, tmp_path / "out")


def test_predict_reads_a_lightning_cli_checkpoint(folder, tmp_path, resolutions, monkeypatch):
    root = tmp_path / "cli"
    # the arguments are LightningCLI's `args`, not pytest's
    monkeypatch.setattr(sys, "argv", ["msdetr"])
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    # One training step, checkpointed at the end of the epoch (as `python -m msdetr fit` does).
    cli_main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "cli" / "synthetic.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=0",
            "--trainer.check_val_every_n_epoch=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={root}",
            f"--data.root={tmp_path / 'synthetic'}",
            "--data.synthetic_train=4",
            "--data.synthetic_val=2",
            "--data.eval_size=40",
            "--data.max_size=64",
            "--data.train_scales=[48]",
            "--data.crop_resize=[48]",
            "--data.crop_size=[32,48]",
            "--model.model.init_args.decoder.init_args.num_layers=1",
        ]
    )
    (ckpt,) = root.rglob("*.ckpt")
    # where LightningCLI saved the run's config
    assert (ckpt.parent.parent / "config.yaml").is_file()
    dets = json.loads(run_predict(ckpt, folder, tmp_path / "out").read_text())
    assert {d["file_name"] for d in dets} == {"a.jpg", "a.png"}
    assert resolutions == [(40, 64)]

    # Elsewhere, without its config.yaml: one sentence saying what to pass.
    moved = tmp_path / "moved" / "model.ckpt"
    moved.parent.mkdir()
    shutil.copy(ckpt, moved)
    with pytest.raises(
        FileNotFoundError,
        match=r"is a Lightning checkpoint without this project's run config, "
        r"and no LightningCLI config.yaml is beside it .* set cli_config=",
    ):
        run_predict(moved, folder, tmp_path / "x")
    run_predict(
        moved,
        folder / "a.jpg",
        tmp_path / "given",
        f"cli_config='{ckpt.parent.parent / 'config.yaml'}'",
    )
    assert resolutions[-1] == (40, 64)

    # A checkpoint whose hyper_parameters carry the module's class_path / init_args config.
    saved = yaml.safe_load((ckpt.parent.parent / "config.yaml").read_text())
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    raw["hyper_parameters"] = {
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
        **saved["model"],
    }
    raw["datamodule_hyper_parameters"] = dict(saved["data"], eval_size=36)
    torch.save(raw, moved)
    run_predict(moved, folder / "a.jpg", tmp_path / "hparams")
    assert resolutions[-1] == (36, 64)


def test_predict_after_training_writes_coco_json_and_pictures(tmp_path):
    """Moved from test_workflow.py: a checkpoint from a real (tiny) training run."""
    cfg = config(tmp_path, "schedule.epochs=1", "callbacks.predictions=null", "logger=none")
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    images = tmp_path / "data" / "synthetic" / "val"
    names = sorted(p.name for p in images.iterdir())

    def run(inp, threshold, out):
        pcfg = compose(
            f"ckpt_path={ckpt}",
            f"input={inp}",
            f"score_threshold={threshold}",
            f"output_dir={out}",
            "eval_size=64",
            "max_size=96",
            "paths.output_dir=unused",
            name="predict",
        )
        return json.loads(predict(pcfg).read_text())

    dets = run(images, 0.0, tmp_path / "pred")
    assert {d["file_name"] for d in dets} == set(names)
    assert all(set(d) == {"image_id", "file_name", "category_id", "bbox", "score"} for d in dets)
    assert all(len(d["bbox"]) == 4 and d["bbox"][2] >= 0 and d["bbox"][3] >= 0 for d in dets)
    assert sorted(p.name for p in (tmp_path / "pred" / "images").iterdir()) == sorted(
        n + ".png" for n in names
    )
    # one image, nothing above the threshold
    assert run(images / names[0], 1.01, tmp_path / "none") == []
    with pytest.raises(FileNotFoundError, match="neither an image nor a folder"):
        run(tmp_path / "nowhere", 0.3, tmp_path / "x")
