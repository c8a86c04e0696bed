"""Fine-tuning with init_from: class heads of another class count, or all of them on request (the
official --finetune), keep their fresh initialisation with one warning; anything else is refused."""

import argparse
import warnings

import lightning as L
import pytest
import torch

import msdetr.run as msdetr_run
from helpers.config import UNUSED_OUTPUT, compose
from helpers.runs import config
from msdetr.checkpoints import load_weights
from msdetr.naming import is_class_head
from msdetr.official import build_from_args, parse_flags, to_official
from msdetr.run import train
from msdetr.run.build import build_datamodule, build_module

SMALL = [
    "--backbone",
    "resnet18",
    "--enc_layers",
    "1",
    "--dec_layers",
    "2",
    "--num_queries",
    "10",
    "--dim_feedforward",
    "64",
]
# (official flags, checkpoint keys that pick the variant): the class heads of each layout.
VARIANTS = {
    "shared_heads": ([], ()),  # one class head shared by the decoder layers
    # + encoder head, decoder aliases
    "two_stage_refine": (["--with_box_refine", "--two_stage"], ()),
    "deta": (
        ["--with_box_refine", "--two_stage", "--assign_first_stage", "--assign_second_stage"],
        (),
    ),
    "ms_detr_a": (
        ["--with_box_refine", "--two_stage", "--use_ms_detr"],
        ("class_embed_o2m.0.weight",),
    ),
}


def _module(variant, num_classes, seed, extra=()):
    flags, keys = VARIANTS[variant]
    torch.manual_seed(seed)
    return build_from_args(
        parse_flags([*SMALL, *flags, *extra]), num_classes=num_classes, keys=keys
    )


def _head(name):
    """This test's own list of class-head parameters (this project's names)."""
    return name.removeprefix("model.").startswith(("class_embed.", "class_embed_o2m."))


def _save(module, path, fmt):
    if fmt == "official":
        sd = to_official(module.model)
        torch.save(
            {"model": sd, "args": argparse.Namespace(**parse_flags(SMALL)), "epoch": 11}, path
        )
    else:  # what Lightning's ModelCheckpoint writes, as far as load_weights reads it
        torch.save(
            {
                "state_dict": module.state_dict(),
                "pytorch-lightning_version": L.__version__,
                "epoch": 11,
            },
            path,
        )
    return path


def _load(module, path, **kw):
    """load_weights, returning the class-head warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_weights(module, str(path), **kw)
    return [str(w.message) for w in caught if "class heads" in str(w.message)]


def _assert_heads_fresh_rest_loaded(target, fresh, source):
    src = source.model.state_dict()
    heads = [k for k in fresh if _head(k)]
    assert heads
    # The test means something: the fresh model differs from the source outside its heads.
    assert any(not torch.equal(fresh[k], src[k]) for k in fresh if not _head(k))
    for name, tensor in target.model.state_dict().items():
        assert torch.equal(tensor, fresh[name] if _head(name) else src[name]), name


# Every head layout through the official names; this project's .ckpt for the two-stage layouts.
CASES = [(v, "official") for v in VARIANTS] + [
    ("two_stage_refine", "lightning"),
    ("ms_detr_a", "lightning"),
]


@pytest.mark.parametrize("variant, fmt", CASES)
def test_other_class_count_keeps_fresh_heads(tmp_path, variant, fmt):
    source = _module(variant, 91, seed=1)
    path = _save(source, tmp_path / ("w.pth" if fmt == "official" else "w.ckpt"), fmt)
    target = _module(variant, 5, seed=2)
    fresh = {k: v.clone() for k, v in target.model.state_dict().items()}
    (message,) = _load(target, path, fine_tune=True)
    _assert_heads_fresh_rest_loaded(target, fresh, source)
    assert str(path) in message and "91 classes" in message and "model's 5" in message
    # Every class head is named: decoder layers (+ the encoder's in two-stage), one-to-many heads.
    num_heads = 3 if VARIANTS[variant][0] else 2
    assert f"class_embed.0-{num_heads - 1}" in message
    assert ("class_embed_o2m.0-1" in message) == (variant == "ms_detr_a")
    if "--two_stage" in VARIANTS[variant][0]:  # the encoder head predicts from the memory tokens
        assert "class_embed.2.weight" in fresh and len(target.model.decoder.layers) == 2


@pytest.mark.parametrize("fmt", ["official", "lightning"])
def test_other_mismatch_is_refused_in_one_sentence(tmp_path, fmt):
    path = _save(_module("two_stage_refine", 91, seed=1), tmp_path / "w.pth", fmt)
    target = _module("two_stage_refine", 5, seed=2, extra=["--dim_feedforward", "32"])
    before = {k: v.clone() for k, v in target.state_dict().items()}
    what = (
        "does not fit the configured architecture"
        if fmt == "official"
        else "trained with another architecture"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=what) as info:
            load_weights(target, str(path), fine_tune=True)
    message = str(info.value)
    assert "\n" not in message and "class heads may differ" in message
    assert "ffn" in message or "linear" in message  # names a tensor that is not a class head
    assert not [w for w in caught if "class heads" in str(w.message)]  # the refusal says it all
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


@pytest.mark.parametrize("fmt", ["official", "lightning"])
def test_strict_without_fine_tune(tmp_path, fmt):
    # Evaluation and resuming (ckpt_path) load the class heads too: another class count is refused.
    path = _save(_module("two_stage_refine", 91, seed=1), tmp_path / "w.pth", fmt)
    with pytest.raises(ValueError, match="architecture"):
        load_weights(_module("two_stage_refine", 5, seed=2), str(path))


def test_missing_tensor_is_refused_when_fine_tuning(tmp_path):
    source = _module("two_stage_refine", 91, seed=1)
    sd = to_official(source.model)
    sd.pop("transformer.level_embed")
    path = tmp_path / "w.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match="1 missing .e.g. transformer.level_embed"):
        load_weights(_module("two_stage_refine", 5, seed=2), str(path), fine_tune=True)


@pytest.mark.parametrize("variant, fmt", CASES)
def test_reset_drops_class_heads_that_fit(tmp_path, variant, fmt):
    # The official --finetune deletes every key with class_embed (decoder heads, encoder head,
    # transformer.decoder.class_embed aliases, MS-DETR o2m heads), whatever their shapes.
    source = _module(variant, 91, seed=1)
    path = _save(source, tmp_path / "w.pth", fmt)
    if fmt == "official" and "--two_stage" in VARIANTS[variant][0]:
        official = torch.load(path, weights_only=False)["model"]
        assert any(k.startswith("transformer.decoder.class_embed.") for k in official)
    target = _module(variant, 91, seed=2)
    fresh = {k: v.clone() for k, v in target.model.state_dict().items()}
    assert any(
        not torch.equal(fresh[k], v) for k, v in source.model.state_dict().items() if _head(k)
    )
    (message,) = _load(target, path, fine_tune=True, reset_class_heads=True)
    _assert_heads_fresh_rest_loaded(target, fresh, source)
    assert "init_reset_class_heads" in message and "--finetune" in message
    # Without the flag, heads that fit are loaded like everything else, silently.
    again = _module(variant, 91, seed=3)
    assert _load(again, path, fine_tune=True) == []
    for name, tensor in again.model.state_dict().items():
        assert torch.equal(tensor, source.model.state_dict()[name]), name


def test_one_rule_for_both_namings():
    names = {
        "class_embed.6.bias": True,
        "model.class_embed.0.weight": True,
        "class_embed_o2m.5.weight": True,
        "transformer.decoder.class_embed.3.weight": True,
        "model.class_embed_o2m.0.bias": True,
        "bbox_embed.0.layers.0.weight": False,
        "transformer.enc_output.weight": False,
        "transformer.decoder.bbox_embed.1.layers.2.bias": False,
        "bbox_embed_o2m.0.layers.0.weight": False,
        "model.transformer.pix_trans.weight": False,
        "query_embed.weight": False,
    }
    assert {n: is_class_head(n) for n in names} == names


@pytest.mark.parametrize("reset", [False, True])
def test_train_init_from(tmp_path, monkeypatch, reset):
    """train.py's init_from: fine-tuning rules, init_reset_class_heads from the config."""
    source_cfg = config(tmp_path, "data.num_classes=91")
    L.seed_everything(1)
    source = build_module(source_cfg)
    path = tmp_path / "source.ckpt"
    torch.save(
        {"state_dict": source.state_dict(), "pytorch-lightning_version": L.__version__}, path
    )
    overrides = (
        ["data.num_classes=91", "init_reset_class_heads=true"] if reset else ["data.num_classes=5"]
    )
    cfg = config(tmp_path, f"init_from={path}", "callbacks.predictions=null", *overrides)
    # The model train() builds before loading: same seed, same construction order.
    L.seed_everything(cfg.seed)
    build_datamodule(cfg)
    fresh = {k: v.clone() for k, v in build_module(cfg).model.state_dict().items()}
    fitted = {}

    def fit(self, module, datamodule=None, ckpt_path=None):
        fitted.update(module=module, ckpt_path=ckpt_path)

    monkeypatch.setattr(L.Trainer, "fit", fit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    (message,) = [str(w.message) for w in caught if "class heads" in str(w.message)]
    assert ("init_reset_class_heads" in message) == reset and ("91 classes" in message) != reset
    assert fitted["ckpt_path"] is None
    _assert_heads_fresh_rest_loaded(fitted["module"], fresh, source)


def test_deta_swin_large_recipe_resets_class_heads():
    # Off unless asked for; train.yaml's keys are defaults an experiment overrides.
    assert compose(UNUSED_OUTPUT).init_reset_class_heads is False
    assert compose("init_reset_class_heads=true", UNUSED_OUTPUT).init_reset_class_heads is True
    cfg = compose("experiment=deta_swin_large_24ep", UNUSED_OUTPUT)
    assert cfg.init_reset_class_heads is True and cfg.model.detector.backbone.name.startswith(
        "swin"
    )
    off = compose("experiment=deta_swin_large_24ep", "init_reset_class_heads=false", UNUSED_OUTPUT)
    assert off.init_reset_class_heads is False


def test_resume_ignores_init_from(tmp_path, monkeypatch):
    # ckpt_path resumes the exact run (strict, inside Lightning); init_from is not read at all.
    calls = []
    monkeypatch.setattr(msdetr_run, "load_weights", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(
        L.Trainer,
        "fit",
        lambda self, module, datamodule=None, ckpt_path=None: calls.append(ckpt_path),
    )
    last = tmp_path / "last.ckpt"
    torch.save({"global_step": 0}, last)
    train(
        config(
            tmp_path,
            "data.num_classes=5",
            f"ckpt_path={last}",
            f"init_from={tmp_path / 'none.pth'}",
            "callbacks.predictions=null",
        )
    )
    assert calls == [str(last)]


def test_box_only_checkpoint_fine_tunes_a_mask_model(tmp_path):
    """A mask model fine-tuned from a box-only detector (this project's .ckpt or official names):
    everything but the mask head loads, the mask head keeps its initialisation, one warning says
    so. Evaluation (no fine_tune) and the reverse direction (a mask head the model would drop) are
    refused."""
    from msdetr.official import load_official_state_dict

    L.seed_everything(1)
    source = build_module(config(tmp_path, "data.num_classes=5"))
    path = tmp_path / "boxes.ckpt"
    torch.save(
        {"state_dict": source.state_dict(), "pytorch-lightning_version": L.__version__}, path
    )
    src = source.model.state_dict()
    for load in (
        lambda m: load_weights(m, str(path), fine_tune=True),
        lambda m: load_official_state_dict(m, to_official(source.model), fine_tune=True),
    ):
        L.seed_everything(2)
        target = build_module(config(tmp_path, "data.num_classes=5", "+parts=mask_head"))
        fresh = {k: v.clone() for k, v in target.model.state_dict().items()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load(target)
        (message,) = [str(w.message) for w in caught if "mask_head" in str(w.message)]
        assert "trained without one" in message and "fresh initialisation" in message
        loaded = target.model.state_dict()
        assert any(k.startswith("mask_head.") for k in loaded)
        for name, tensor in loaded.items():
            expected = fresh[name] if name.startswith("mask_head.") else src[name]
            assert torch.equal(tensor, expected), name
    with pytest.raises(ValueError, match="trained with another architecture"):
        load_weights(target, str(path))  # evaluating a mask model needs its mask head
    masked = tmp_path / "masks.ckpt"
    torch.save(
        {"state_dict": target.state_dict(), "pytorch-lightning_version": L.__version__}, masked
    )
    with pytest.raises(ValueError, match="unexpected"):
        load_weights(source, str(masked), fine_tune=True)
