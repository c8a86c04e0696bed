"""model.compile=true: the compiled detector gives the eager outputs and gradients, batches of
another shape reuse the compilation, the forward is one graph (the Triton op included), checkpoints
are the same, and the config trains through Lightning."""

import contextlib
import dataclasses
import os

import pytest
import torch
from torch._dynamo.utils import counters

from helpers.config import UNUSED_OUTPUT, compose
from helpers.detectors import tiny_detector
from msdetr.config_schema import ConfigValidationError, validate
from msdetr.lit import CompileOptions
from msdetr.run.build import build_datamodule, build_module, build_trainer
from msdetr.run.resume import check_resume_config

# MS-DETR++ (two-stage, refine, mixed selection, look-forward-twice, one-to-many stream) at toy
# size.
TINY_PP = [
    "experiment=ms_detr_pp_300",
    "data.num_classes=5",
    "model.detector.backbone.name=resnet18",
    "model.detector.backbone.pretrained=false",
    "model.num_queries=10",
    "model.hidden_dim=32",
    "model.nheads=4",
    "model.detector.encoder.num_layers=1",
    "model.detector.decoder.num_layers=1",
    "model.dim_feedforward=32",
    "model.attn_backend=reference",
    # A frozen backbone halves the joint graph the compilation traces (its forward is still
    # compiled).
    "model.detector.backbone.train_backbone=false",
]
TOL = dict(rtol=1e-4, atol=1e-5)
# The backend of the dynamic-shape test. aot_eager is everything model.compile changes about the
# program (Dynamo's capture with symbolic sizes, guards, AOTAutograd's functionalized joint forward
# / backward graph) except inductor's code generation, which on 2 CPU cores takes over 15 minutes
# for even this toy detector with dynamic sizes; MSDETR_TEST_COMPILE_BACKEND=inductor runs it with
# inductor.
BACKEND = os.environ.get("MSDETR_TEST_COMPILE_BACKEND", "aot_eager")


def make_batch(b, h, w, seed, masks=False):
    """Padded images (each one's valid region smaller than the batch's) with two boxes each (and,
    with `masks`, the boxes filled as their instance masks at each image's valid size)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, h, w, generator=g)
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    for i in range(1, b):
        mask[i, h - 8 * i :, :] = True
        mask[i, :, w - 16 * i :] = True
    targets = [
        {
            "labels": torch.tensor([1, 3]),
            "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.3, 0.6, 0.2, 0.2]]),
        }
        for _ in range(b)
    ]
    if masks:
        for i, target in enumerate(targets):
            vh, vw = h - 8 * i if i else h, w - 16 * i if i else w
            filled = torch.zeros(2, vh, vw, dtype=torch.bool)
            for k, (cx, cy, bw, bh) in enumerate(target["boxes"].tolist()):
                x0, x1 = round((cx - bw / 2) * vw), round((cx + bw / 2) * vw)
                y0, y1 = round((cy - bh / 2) * vh), round((cy + bh / 2) * vh)
                filled[k, y0:y1, x0:x1] = True
            target["masks"] = filled
    return images, mask, targets


def flat(outputs, prefix=""):
    """{path: tensor} of a nested output dict / list."""
    if isinstance(outputs, torch.Tensor):
        return {prefix: outputs}
    items = outputs.items() if isinstance(outputs, dict) else enumerate(outputs)
    return {k: v for key, value in items for k, v in flat(value, f"{prefix}/{key}").items()}


def assert_outputs_close(compiled, eager):
    a, b = flat(compiled), flat(eager)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")


def fresh_counters():
    counters.clear()
    torch._dynamo.reset()


# With the mask head (conf/parts/mask_head.yaml): its pixel embedding and per-layer mask embeddings
# are in the compiled forward too.
MASKS = ["+parts=mask_head", "matcher.mask_points=64"]


@pytest.mark.slow
@pytest.mark.parametrize("masks", [False, True], ids=["boxes", "masks"])
def test_compiled_detector_matches_eager_and_does_not_recompile(masks):
    """Compiled with dynamic sizes (BACKEND): training outputs, loss and every gradient, then the
    eval outputs, equal the eager module's; the second training and eval batches (another batch size
    and image size) run under `fail_on_recompile`; the forward is one graph in each mode, with no
    graph break. The same with the mask head."""
    fresh_counters()
    torch.manual_seed(0)
    extra = MASKS if masks else []
    eager = build_module(compose(*TINY_PP, *extra, UNUSED_OUTPUT))
    compiled = build_module(
        compose(
            *TINY_PP,
            *extra,
            "model.compile=true",
            f"model.compile_backend={BACKEND}",
            UNUSED_OUTPUT,
        )
    )
    compiled.load_state_dict(eager.state_dict())
    compiled.configure_model()
    assert compiled.detector_compiled and not eager.detector_compiled
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # no `_orig_mod.` prefixes
    criterion = eager.criterion  # one criterion, so both sides are matched by the same code

    batches = [make_batch(2, 128, 160, 1, masks), make_batch(3, 96, 144, 2, masks)]
    for module in (eager, compiled):
        module.train()
    for i, (images, mask, targets) in enumerate(batches):
        # Warm-up is the first batch; any later shape must reuse its compilation.
        with torch.compiler.set_stance("fail_on_recompile") if i else contextlib.nullcontext():
            out_c = compiled(images, mask)
        out_e = eager(images, mask)
        assert_outputs_close(out_c, out_e)
        losses = []
        for out in (out_c, out_e):
            torch.manual_seed(7)  # the same random points for the mask losses
            losses.append(criterion.total(criterion(out, targets)))
        loss_c, loss_e = losses
        torch.testing.assert_close(loss_c, loss_e, **TOL)
        for module, loss in ((compiled, loss_c), (eager, loss_e)):
            module.zero_grad(set_to_none=True)
            loss.backward()
        grads_e = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
        grads_c = {n: p.grad for n, p in compiled.named_parameters() if p.grad is not None}
        assert grads_c.keys() == grads_e.keys() and len(grads_e) > 50
        for name in grads_e:
            torch.testing.assert_close(
                grads_c[name],
                grads_e[name],
                rtol=1e-4,
                atol=2e-5,
                msg=lambda m, name=name: f"{name}: {m}",
            )

    for module in (eager, compiled):
        module.eval()
    with torch.no_grad():
        for i, (images, mask, _) in enumerate(reversed(batches)):
            # The first eval batch compiles the eval graph (the training flag is guarded on).
            with torch.compiler.set_stance("fail_on_recompile") if i else contextlib.nullcontext():
                out_c = compiled(images, mask)
            assert "o2m_outputs" not in out_c
            assert_outputs_close(out_c, eager(images, mask))

    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2  # training and evaluation, each one whole graph


def _graph_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def test_triton_attention_is_one_op_in_the_graph():
    """With the Triton backend (run by its CPU interpreter here) the custom op is traced as
    `torch.ops.msdetr.ms_deform_attn_fwd`, inside the detector's single graph, not a graph break."""
    fresh_counters()
    model = tiny_detector(
        "model=deformable_detr_two_stage_refine",
        "model.num_queries=4",
        "model.hidden_dim=32",
        "model.nheads=2",
        "model.detector.decoder.num_layers=1",
        "model.dim_feedforward=32",
        "model.attn_backend=triton",
    ).eval()
    images, mask, _ = make_batch(2, 64, 96, seed=3)
    graphs = []
    compiled = torch.compile(model, backend=_graph_backend(graphs), dynamic=False, fullgraph=True)
    with torch.no_grad():
        out = compiled(images, mask)
        expected = model(images, mask)
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    # encoder + decoder layer
    assert targets.count(torch.ops.msdetr.ms_deform_attn_fwd.default) == 2
    torch.testing.assert_close(out["pred_boxes"], expected["pred_boxes"], **TOL)
    assert dict(counters["graph_break"]) == {}


@pytest.mark.slow
def test_compile_config_trains_through_lightning_and_checkpoints_stay_eager(tmp_path):
    """model.compile=true from the command line: configure_model compiles the detector, a
    fast_dev_run trains and validates, and the checkpoint loads into an eager module (same keys,
    same weights)."""
    from msdetr.checkpoints import load_weights

    fresh_counters()
    # Dynamo's capture only (the eager backend), static shapes: the wiring, fast; the dynamic-shape
    # compilation and its numerics are the test above.
    overrides = [
        "model.num_queries=10",
        "model.hidden_dim=32",
        "model.nheads=4",
        "model.detector.encoder.num_layers=1",
        "model.detector.decoder.num_layers=1",
        "model.dim_feedforward=32",
        "model.postprocess.num_select=10",
        "data.synthetic_train=2",
        "data.synthetic_val=2",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.train_scales=[64]",
        "data.max_size=80",
        "data.crop_resize=[64]",
        "data.crop_size=[48,64]",
        "data.eval_size=64",
        "logger=none",
        "callbacks=none",
        "trainer.fast_dev_run=1",
        f"paths.data_root={tmp_path / 'data'}",
        f"paths.output_dir={tmp_path / 'run'}",
        "model.compile=true",
        "model.compile_backend=eager",
        "model.compile_dynamic=false",
        # `auto` is `gather` on the CPU, whose nonzero breaks the graph
        "model.attn_backend=reference",
    ]
    cfg = compose(*overrides)
    validate(cfg)
    datamodule = build_datamodule(cfg)  # sets data.num_classes
    module = build_module(cfg)
    # compiled when the Trainer sets it up
    assert module.compile_options is not None and not module.detector_compiled
    trainer = build_trainer(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert module.detector_compiled
    assert trainer.global_step == 1
    assert counters["stats"]["unique_graphs"] >= 1  # the detector went through Dynamo
    assert dict(counters["graph_break"]) == {}
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert not [k for k in state if "_orig_mod" in k]
    cfg.model.compile = False
    eager = build_module(cfg)
    assert state.keys() == eager.state_dict().keys()
    load_weights(eager, str(path))
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)


def test_compile_mode_needs_inductor():
    with pytest.raises(
        ConfigValidationError,
        match=r"^model.compile_mode=max-autotune is not allowed with "
        r"model.compile_backend=aot_eager: .*\.$",
    ):
        validate(
            compose(
                "model.compile_mode=max-autotune", "model.compile_backend=aot_eager", UNUSED_OUTPUT
            )
        )


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.compile=true"],
        [
            "model.compile=true",
            "model.compile_mode=max-autotune-no-cudagraphs",
            "model.compile_dynamic=null",
        ],
        ["model.compile=true", "model.compile_backend=aot_eager", "model.compile_dynamic=false"],
    ],
)
def test_compile_options_validate_and_reach_the_module(overrides):
    cfg = compose(
        *overrides, "model.detector.backbone.pretrained=false", "data.num_classes=5", UNUSED_OUTPUT
    )
    validate(cfg)
    module = build_module(cfg)
    assert module.compile_options == CompileOptions(
        mode=cfg.model.compile_mode,
        dynamic=cfg.model.compile_dynamic,
        backend=cfg.model.compile_backend,
    )
    # saved as plain values
    assert module.hparams.compile_options == dataclasses.asdict(module.compile_options)
    assert not module.detector_compiled  # nothing happens before configure_model
    cfg.model.compile = False
    assert build_module(cfg).compile_options is None  # eager


def test_resume_may_switch_compile(tmp_path):
    """Compilation and the attention backend are how the model runs, not what it is: a checkpoint
    made without them (or before the keys existed) resumes with model.compile=true or another
    backend."""
    from msdetr.run.build import plain_config

    saved = plain_config(compose(UNUSED_OUTPUT))
    for key in ("compile", "compile_mode", "compile_dynamic", "compile_backend"):
        del saved["model"][key]
    path = tmp_path / "last.ckpt"
    torch.save({"msdetr_config": saved, "global_step": 7}, path)
    compiled = compose("model.compile=true", "model.compile_backend=aot_eager", UNUSED_OUTPUT)
    assert check_resume_config(compiled, path) == 7
    assert check_resume_config(compose("model.attn_backend=reference", UNUSED_OUTPUT), path) == 7
    with pytest.raises(ValueError, match="model.num_queries"):
        check_resume_config(compose("model.num_queries=5", UNUSED_OUTPUT), path)
