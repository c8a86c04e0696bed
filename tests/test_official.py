"""Official checkpoint interop: manifests round trip, safe checkpoint files, clear refusals."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from msdetr.official import (
    _convert_state_dict,
    build_model,
    from_official,
    official_names,
    parse_flags,
    to_official,
)

MANIFESTS = sorted((Path(__file__).parent / "fixtures" / "manifests").glob("*.json"))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_manifest_round_trip(path):
    manifest = json.loads(path.read_text())
    expected = {k: tuple(v) for k, v in manifest["state_dict"].items()}
    args = parse_flags(manifest["flags"])
    model = build_model(args, num_classes=expected["class_embed.0.weight"][0], keys=expected)
    official = to_official(model)
    assert {k: tuple(v.shape) for k, v in official.items()} == expected
    # Back again: a state dict with distinct values per key lands on the same tensors.
    values = {k: torch.full(v, float(i)) for i, (k, v) in enumerate(expected.items())}
    mine = _convert_state_dict(model, values)
    assert set(mine) == set(model.state_dict())
    model.load_state_dict(mine)
    again = to_official(model)
    assert set(again) == set(values)
    names = official_names(model)
    assert len(names) == len(dict(model.named_parameters()))
    assert set(names.values()) <= set(expected)
    for name, tensor in again.items():
        src = values[name]
        if not torch.equal(tensor, src):
            # Only aliases of a shared head may differ: they take the value of the winning name
            # (DINO: one class head and one box head under every decoder layer's names).
            assert name.startswith(
                ("transformer.decoder.", "bbox_embed_o2m.", "bbox_embed.", "class_embed.")
            ), name
    # The manifest's count is over the whole official state dict (aliases and buffers included).
    assert sum(v.numel() for v in official.values()) == manifest["params"]


def test_flags_parse_types():
    args = parse_flags(
        ["--two_stage", "--num_queries", "900", "--dropout", "0.0", "--cls_loss_coef", "1"]
    )
    assert args["two_stage"] is True and args["num_queries"] == 900
    assert args["dropout"] == 0.0 and args["cls_loss_coef"] == 1.0
    with pytest.raises(ValueError, match="takes no value"):
        parse_flags(["--two_stage", "yes"])


def _small_flags():
    return [
        "--with_box_refine",
        "--two_stage",
        "--enc_layers",
        "1",
        "--dec_layers",
        "2",
        "--num_queries",
        "10",
        "--dim_feedforward",
        "64",
        "--backbone",
        "resnet18",
    ]


def test_checkpoint_file_round_trip(tmp_path):
    args = parse_flags(_small_flags())
    model = build_model(args)
    ckpt = {"model": to_official(model), "args": argparse.Namespace(**args), "epoch": 3}
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    module = from_official(path)
    for k, v in module.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


class Evil:
    """Stands for any object a checkpoint could smuggle in."""


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": Evil()}, path)
    with pytest.raises(
        ValueError, match="could not be read as an official checkpoint safely"
    ) as info:
        from_official(path)
    # one sentence naming what it holds, never torch's advice to load it unsafely
    assert "test_official.Evil" in str(info.value) and "weights_only" not in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "content, reason", [(b"", "it is empty (0 bytes)"), (b"PK\x03\x04trunc", "could not be read")]
)
def test_empty_or_truncated_checkpoint_is_one_sentence(tmp_path, content, reason):
    """Issue 20: a zero-byte file gave IndexError inside the error path."""
    path = tmp_path / "last.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="could not be read as an official checkpoint") as info:
        from_official(path)
    assert (
        reason in str(info.value)
        and "weights_only" not in str(info.value)
        and "\n" not in str(info.value)
    )


@pytest.mark.slow
@pytest.mark.parametrize("script", ["evaluate.py", "predict.py"])
def test_zero_byte_checkpoint_through_the_scripts(tmp_path, script):
    import os
    import subprocess
    import sys

    import torchvision

    from helpers import ROOT

    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "images").mkdir()
    torchvision.io.write_png(
        torch.zeros(3, 8, 8, dtype=torch.uint8), str(tmp_path / "images" / "a.png")
    )
    args = (
        ["experiment=synthetic_cpu", f"paths.data_root={tmp_path / 'data'}"]
        if script == "evaluate.py"
        else [f"input={tmp_path / 'images'}"]
    )
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / script),
            f"ckpt_path={tmp_path / 'empty.ckpt'}",
            *args,
            f"hydra.run.dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )
    assert result.returncode != 0
    assert "it is empty (0 bytes)" in result.stderr
    assert "Traceback" not in result.stderr and "IndexError" not in result.stderr


def test_architecture_mismatch_is_one_sentence():
    args = parse_flags(_small_flags())
    sd = to_official(build_model(args))
    other = [f for f in _small_flags()] + ["--num_queries", "20"]
    sd.pop("transformer.level_embed")
    with pytest.raises(ValueError, match="does not fit the configured architecture: 1 missing"):
        from_official(sd, other)


def test_unsafe_backbone_weights_are_one_sentence(tmp_path):
    from msdetr.models import Backbone

    path = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": Evil()}, path)
    with pytest.raises(ValueError, match="could not be read as backbone weights safely") as info:
        Backbone(name="resnet18", pretrained=str(path))
    assert "weights_only" not in str(info.value)
