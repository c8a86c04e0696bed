"""The composed config is checked (types, ranges) before Lightning is imported: one sentence per
mistake."""

import dataclasses
import inspect
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from helpers import CONF, ROOT
from helpers.config import compose
from msdetr.config_schema import ATTN_BACKENDS, ConfigValidationError, RunConfig, validate


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# Every option of every group, each with the rest of train.yaml's defaults (matchers with the
# default model), and every experiment on its own.
SHIPPED = [
    f"{group}={option}"
    for group in (
        "experiment",
        "matcher",
        "model",
        "backbone",
        "schedule",
        "data",
        "trainer",
        "logger",
        "callbacks",
        "hparams_search",
        "cluster",
    )
    for option in options(group)
]


@pytest.mark.parametrize("override", SHIPPED)
def test_every_shipped_config_validates(override):
    validate(compose(override))


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("evaluate", []),
        ("evaluate", ["experiment=deta_12ep"]),
        ("predict", []),
        ("predict", ["eval_size=800", "max_size=1333"]),
    ],
)
def test_evaluate_and_predict_configs_validate(name, overrides):
    validate(compose(*overrides, name=name))


def test_validation_leaves_the_config_as_composed():
    cfg = compose("experiment=ms_detr_pp_900", "schedule.optim.lr=1", "trainer.devices=[0,1]")
    before = OmegaConf.to_yaml(cfg)  # unresolved: interpolations and int-vs-float stay visible
    validate(cfg)
    assert OmegaConf.to_yaml(cfg) == before
    assert isinstance(cfg.schedule.optim.lr, int)  # the schema's float is not written back


@pytest.mark.parametrize(
    "override, sentence",
    [
        (
            "trainer.max_epochs=abc",
            "trainer.max_epochs=abc is not allowed: Value 'abc' of type 'str' could not be "
            "converted to Integer.",
        ),
        ("model.num_queries=0", "model.num_queries=0 is not allowed: use an integer >= 1."),
        ("schedule.optim.lr=-1", "schedule.optim.lr=-1 is not allowed: use a number > 0."),
        ("data.batch_size=0", "data.batch_size=0 is not allowed: use an integer >= 1."),
        # trainer.max_epochs interpolates schedule.epochs: the error names the key that was set
        ("schedule.epochs=0", "schedule.epochs=0 is not allowed: use an integer >= 1."),
        (
            "schedule.optim.lr_backbone=-1e-5",
            "schedule.optim.lr_backbone=-1e-05 is not allowed: use a number >= 0.",
        ),
        (
            "schedule.optim.weight_decay=-1",
            "schedule.optim.weight_decay=-1 is not allowed: use a number >= 0.",
        ),
        (
            "schedule.clip_max_norm=-0.1",
            "schedule.clip_max_norm=-0.1 is not allowed: use a number >= 0 or null.",
        ),
        ("data.train_scales=[96,0]", "data.train_scales[1]=0 is not allowed: use an integer >= 1."),
        (
            "data.train_scales=[96,x]",
            "data.train_scales[1]=x is not allowed: Value 'x' of type 'str' could not be "
            "converted to Integer.",
        ),
        ("model.dropout=1", "model.dropout=1 is not allowed: use a number in [0, 1)."),
        (
            "model.detector.box_refine=maybe",
            "model.detector.box_refine=maybe is not allowed: Value 'maybe' is not a valid bool "
            "(type str).",
        ),
        (
            "model.detector.decoder.num_layers=0",
            "model.detector.decoder.num_layers=0 is not allowed: use an integer >= 1.",
        ),
        (
            "model.detector.encoder.layer.n_points=0",
            "model.detector.encoder.layer.n_points=0 is not allowed: use an integer >= 1.",
        ),
        (
            "model.attn_backend=cuda",
            "model.attn_backend=cuda is not allowed: use 'auto', 'triton', 'reference', 'gather'.",
        ),
        (
            "model=deta model.detector.queries.iou_threshold=2",
            "model.detector.queries.iou_threshold=2 is not allowed: use a number in [0, 1].",
        ),
        (
            "model.hidden_dim=100",
            "model.hidden_dim=100 is not allowed: use a multiple of model.nheads=8.",
        ),
        (
            "trainer.devices=0",
            "trainer.devices=0 is not allowed: use a count >= 1, -1 (all devices), 'auto' or a "
            "list of device indices.",
        ),
        (
            "model.compile=maybe",
            "model.compile=maybe is not allowed: Value 'maybe' is not a valid bool (type str).",
        ),
        (
            "model.compile_mode=fast",
            "model.compile_mode=fast is not allowed: use 'default', 'reduce-overhead', "
            "'max-autotune', 'max-autotune-no-cudagraphs' or null.",
        ),
        (
            "model.compile=true model.compile_mode=reduce-overhead",
            "model.compile_mode=reduce-overhead is not allowed: it records CUDA graphs per input "
            "shape and the image sizes change with nearly every batch, so use 'default', "
            "'max-autotune-no-cudagraphs' or null.",
        ),
        (
            "model.compile=true model.compile_mode=max-autotune",
            "model.compile_mode=max-autotune is not allowed: it records CUDA graphs per input "
            "shape and the image sizes change with nearly every batch, so use 'default', "
            "'max-autotune-no-cudagraphs' or null.",
        ),
        (
            "model.compile_dynamic=sometimes",
            "model.compile_dynamic=sometimes is not allowed: Value 'sometimes' is not a valid "
            "bool (type str).",
        ),
        (
            "model.compile_backend=",
            "model.compile_backend= is not allowed: use a torch.compile backend name "
            "('inductor', 'aot_eager', 'eager').",
        ),
    ],
)
def test_a_wrong_value_is_one_sentence(override, sentence):
    with pytest.raises(ConfigValidationError) as err:
        validate(compose(*override.split()))
    assert str(err.value) == sentence


@pytest.mark.parametrize(
    "override",
    [
        "schedule.clip_max_norm=null",
        "schedule.optim.lr_drop_epochs=null",
        "trainer.devices=-1",
        "trainer.devices=[0,1]",
        "trainer.devices=auto",
        "trainer.fast_dev_run=true",
        "trainer.fast_dev_run=3",
        "+trainer.limit_train_batches=2",
        "trainer.max_epochs=-1",
        "schedule.optim.lr=1",
        "+model.detector.backbone.extra=1",
        "data.num_classes=null",
    ],
)
def test_allowed_values_and_extra_keys_pass(override):
    validate(compose(override))


def test_schema_keys_are_the_code_parameters():
    """A key the schema checks is one the code takes (a renamed parameter would leave it
    unchecked)."""
    import lightning as L

    from msdetr import models
    from msdetr.data import CocoDataModule
    from msdetr.kernels import BACKENDS
    from msdetr.lit import LRSchedule, ParamGroups
    from msdetr.postprocess import NMSPostProcess, TopKPostProcess

    def params(*classes):
        return set().union(*(inspect.signature(c.__init__).parameters for c in classes))

    def keys(section):  # the checked values of a section (its sub-sections left out)
        return {k for k in section if OmegaConf.is_missing(section, k)}

    schema = OmegaConf.structured(RunConfig)
    detector = schema.model.detector
    assert keys(detector) <= params(models.DeformableDETR)
    assert keys(detector.encoder) <= params(models.DeformableEncoder)
    assert keys(detector.encoder.layer) <= params(models.EncoderLayer)
    assert keys(detector.decoder) <= params(models.DeformableDecoder)
    assert keys(detector.decoder.layer) <= params(models.DecoderLayer)
    assert keys(detector.queries) <= params(
        models.LearnedQueries,
        models.TwoStageQueries,
        models.NMSTwoStageQueries,
        models.DINOQueries,
        models.AnchorQueries,
    )
    # the shared sizes are keys of the model config, and the backends those of the kernels
    assert keys(schema.model) <= set(OmegaConf.load(CONF / "model" / "deformable_detr.yaml"))
    assert ATTN_BACKENDS == BACKENDS
    assert keys(schema.model.postprocess) <= params(TopKPostProcess, NMSPostProcess)
    assert keys(schema.data) <= params(CocoDataModule)
    # the trainer config's, the LR schedule's
    assert keys(schema.schedule) <= {"epochs", "clip_max_norm", "lr_interval"}
    assert "interval" in {f.name for f in dataclasses.fields(LRSchedule)}  # lr_interval
    # the parameter groups' (ParamGroups), or values the optimizer and LR scheduler configs read
    schedule = (CONF / "schedule" / "50ep.yaml").read_text()
    read = {k for k in keys(schema.schedule.optim) if f"${{schedule.optim.{k}}}" in schedule}
    assert keys(schema.schedule.optim) - read <= {f.name for f in dataclasses.fields(ParamGroups)}
    assert keys(schema.trainer) <= params(L.Trainer)
    top = keys(schema)
    shipped = set().union(
        *(OmegaConf.load(CONF / f"{n}.yaml").keys() for n in ("train", "evaluate", "predict"))
    )
    assert top <= shipped


@pytest.mark.parametrize(
    "script, args, sentence",
    [
        (
            "train.py",
            ["trainer.max_epochs=abc"],
            "trainer.max_epochs=abc is not allowed: Value 'abc' of type 'str' could not be "
            "converted to Integer.",
        ),
        (
            "evaluate.py",
            ["ckpt_path=none.ckpt", "data.batch_size=0"],
            "data.batch_size=0 is not allowed: use an integer >= 1.",
        ),
        (
            "predict.py",
            ["ckpt_path=none.ckpt", "input=none", "batch_size=0"],
            "batch_size=0 is not allowed: use an integer >= 1.",
        ),
    ],
)
def test_entry_script_stops_in_one_sentence_before_importing_lightning(
    tmp_path, script, args, sentence
):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            str(ROOT / script),
            *args,
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env=env,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in lines
        if line.startswith("import time:")
    }
    assert "hydra" in imported and not imported & {"torch", "lightning"}
    errors = [line for line in lines if not line.startswith("import time:") and line.strip()]
    assert sentence in errors
    assert "Traceback" not in result.stderr
