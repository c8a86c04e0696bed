"""The parity fixtures (official code run on CPU): outputs, every loss, gradient norms,
detections."""

import pytest
import torch

from helpers import load_fixture
from helpers.parity import (
    dn_detr_loss_name,
    feed_dn_detr_denoising,
    feed_fixture_denoising,
    fixture_batch,
    fixture_state_dict,
    flatten_outputs,
    rel_err,
)
from msdetr.official import from_official, official_names

TOL_OUT = 2e-5
TOL_GRAD = 1e-4


# deformable_detr: two-stage + refine; ms_detr_c / ms_detr_c_pp: MS-DETR root code (Figure 4 c + aux
# FFN, without / with mixed selection and look-forward-twice); ms_detr_a: MS-DETR impl_a (Figure 4
# a);
# deta: 5 levels, NMS proposal selection, pix_trans, stage-1/2 IoU assigners, NMS post-processing.
# The dense ones (100 queries, 12-22 GTs an image) put queries in the top-k of two GTs of different
# classes, where each assigner's own pair order decides the class (matching/quality.py).
FIXTURES = [
    "deformable_detr",
    "ms_detr_c",
    "ms_detr_c_pp",
    "ms_detr_a",
    "deta",
    "deta_dense",
    "ms_detr_pp_dense",
]

# Fixtures that also carry the official code's float64 gradients (`grad_norms_fp64`). There the fp32
# gradients are limited by rounding, not by the code: DETA's backbone has ReLU inputs within fp32
# rounding of zero (layer4), and across 9 seeds the official fp32 gradient norms sat 5e-5 to 2.5e-4
# from its own float64 ones, as two fp32 runs on different CPUs differ from each other. So these are
# held both ways: a float64 run to the official float64 norms at 1e-7 (the code is the same), and
# the fp32 run to the official fp32 norms at 3e-4 (the rounding noise).
FLOAT64_FIXTURES = ["deta", "deta_dense", "ms_detr_pp_dense"]
TOL_GRAD_FP64 = 1e-7
TOL_GRAD_FP32_NOISY = 3e-4


def run_fixture(fx, module, *model_args):
    """One training step (forward, every loss, backward) and one evaluation of a fixture's batch;
    `model_args`: what the training forward takes besides the batch (the targets, for denoising)."""
    images, mask = fixture_batch(fx)
    module.train()
    outputs = module.model(images, mask, *model_args)
    losses = module.criterion(outputs, fx["targets"])
    total = module.criterion.total(losses)
    total.backward()
    module.eval()
    with torch.no_grad():
        eval_out = module.model(images, mask)
    detections = module.postprocess(eval_out, fx["orig_sizes"])
    return fx, module, outputs, losses, total, eval_out, detections


@pytest.fixture(scope="module", params=FIXTURES)
def run(request):
    fx = load_fixture(f"{request.param}.pt")
    return run_fixture(fx, from_official(fixture_state_dict(fx), fx["flags"]))


def test_outputs(run):
    fx, _, outputs, *_ = run
    expected = flatten_outputs(fx["outputs"])
    actual = flatten_outputs(outputs)
    assert set(expected) <= set(actual)
    for name, value in expected.items():
        assert rel_err(actual[name], value) < TOL_OUT, name


def test_losses_and_weights(run):
    fx, module, _, losses, total, *_ = run
    assert set(losses) == set(fx["losses"])
    for name, value in fx["losses"].items():
        assert rel_err(losses[name], value) < TOL_OUT, name
    # The official MS-DETR weight_dict also names encoder aux terms that are never computed.
    assert module.criterion.weight_dict == {
        k: v for k, v in fx["weight_dict"].items() if k in fx["losses"]
    }
    assert rel_err(total, fx["total_loss"]) < TOL_OUT


def _float64_grads(fx):
    module = from_official(fixture_state_dict(fx), fx["flags"]).double()
    images, mask = fixture_batch(fx)
    targets = [
        {k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in fx["targets"]
    ]
    module.train()
    losses = module.criterion(module.model(images.double(), mask), targets)
    module.criterion.total(losses).backward()
    return module


def _check_grads(module, grad_norms, full_grads, tol):
    names = official_names(module)
    grads = {names[n]: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert set(grads) == set(grad_norms)
    for name, (norm, _) in grad_norms.items():
        assert abs(grads[name].double().norm() - norm) <= tol * abs(norm), name
    for name, expected in full_grads.items():
        assert rel_err(grads[name], expected) < tol, name


def test_gradient_norms(run):
    fx, module, *_ = run
    tol = TOL_GRAD_FP32_NOISY if fx["name"] in FLOAT64_FIXTURES else TOL_GRAD
    _check_grads(module, fx["grad_norms"], fx["grads"], tol)


@pytest.mark.parametrize("name", FLOAT64_FIXTURES)
def test_float64_gradient_norms(name):
    """The same step in float64 against the official code's float64 run: equal up to float64
    rounding."""
    fx = load_fixture(f"{name}.pt")
    _check_grads(_float64_grads(fx), fx["grad_norms_fp64"], {}, TOL_GRAD_FP64)


def test_detections(run):
    fx, _, _, _, _, eval_out, detections = run
    for name, value in flatten_outputs(fx["eval_outputs"]).items():
        assert rel_err(flatten_outputs(eval_out)[name], value) < TOL_OUT, name
    for det, ref in zip(detections, fx["detections"]):
        assert torch.equal(det["labels"], ref["labels"])
        assert rel_err(det["scores"], ref["scores"]) < TOL_OUT
        assert rel_err(det["boxes"], ref["boxes"]) < TOL_OUT


def test_triton_backend_matches_on_reduced_input():
    """The same fixture model through the Triton kernels (CPU interpreter) on cropped images: every
    output, loss and gradient equals the reference path that the tests above hold to the official
    code."""
    fx = load_fixture("deformable_detr.pt")
    images, mask = fixture_batch(fx)
    images, mask = images[:, :, :64, :96].contiguous(), mask[:, :64, :96].contiguous()
    runs = []
    for backend in ("reference", "triton"):
        module = from_official(fixture_state_dict(fx), fx["flags"])
        module.model.set_attn_backend(backend)
        module.train()
        out = module.model(images, mask)
        losses = module.criterion(out, fx["targets"])
        module.criterion.total(losses).backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        runs.append((flatten_outputs(out), losses, grads))
    (ref_out, ref_loss, ref_grad), (tri_out, tri_loss, tri_grad) = runs
    for name, value in ref_out.items():
        assert rel_err(tri_out[name], value) < TOL_OUT, name
    for name, value in ref_loss.items():
        assert rel_err(tri_loss[name], value) < TOL_OUT, name
    assert set(tri_grad) == set(ref_grad)
    for name, g in ref_grad.items():
        assert (
            abs(tri_grad[name].double().norm() - g.double().norm()) <= TOL_GRAD * g.double().norm()
        ), name


# DINO (IDEA-Research/DINO, config/DINO/DINO_4scale.py with the fixture's overrides): without and
# with contrastive denoising. The denoising block draws the fixture's own noise
# (`feed_fixture_denoising`).
# DINO's outputs are its own dict: `interm_outputs` is this model's `enc_outputs` (the selected
# proposals; `interm_outputs_for_matching_pre` their unregressed `anchors`), `dn_meta`'s
# `output_known_lbs_bboxes` its `dn_outputs`.
DINO_FIXTURES = ["dino_nodn", "dino"]
# Logged by DINO for every branch and layer, never weighted: the L1 of the centres and of the sizes.
DINO_LOGGED_ONLY = ("loss_xy", "loss_hw")


def _dino_as_official(out) -> dict:
    ours = {
        k: v for k, v in out.items() if k not in ("enc_outputs", "dn_outputs", "init_reference")
    }
    enc = out["enc_outputs"]
    ours["interm_outputs"] = {"pred_logits": enc["pred_logits"], "pred_boxes": enc["pred_boxes"]}
    ours["interm_outputs_for_matching_pre"] = {
        "pred_logits": enc["pred_logits"],
        "pred_boxes": enc["anchors"],
    }
    if "dn_outputs" in out:
        dn = out["dn_outputs"]
        ours["dn_meta"] = {
            "output_known_lbs_bboxes": {
                k: dn[k] for k in ("pred_logits", "pred_boxes", "aux_outputs")
            }
        }
    return ours


@pytest.fixture(scope="module", params=DINO_FIXTURES)
def dino_run(request):
    fx = load_fixture(f"{request.param}.pt")
    module = from_official(fixture_state_dict(fx), fx["flags"])
    if "dn" in module.model.training_queries:
        feed_fixture_denoising(module.model.training_queries["dn"], fx)
    return run_fixture(fx, module, fx["targets"])


def test_dino_outputs(dino_run):
    fx, _, outputs, *_ = dino_run
    expected = flatten_outputs({k: v for k, v in fx["outputs"].items() if v is not None})
    actual = flatten_outputs(_dino_as_official(outputs))
    assert set(expected) == set(actual)
    for name, value in expected.items():
        assert rel_err(actual[name], value) < TOL_OUT, name


def test_dino_denoising_queries_and_mask(dino_run):
    fx, module, outputs, *_ = dino_run
    if fx["dn"] is None:
        assert "dn_outputs" not in outputs and not module.model.training_queries
        return
    dn, q = fx["dn"], module.model.num_queries
    assert (
        module.model.training_queries["dn"].sizes(q, fx["targets"])
        == [2 * dn["single_pad"]] * dn["num_dn_group"]
    )
    torch.testing.assert_close(
        outputs["dn_outputs"]["init_reference"], torch.sigmoid(dn["input_query_bbox"])
    )
    # DINO puts the denoising queries first; this model after the one-to-one queries.
    block = module.model.training_queries["dn"]
    mask = module.model.self_attn_mask([block], [[q], block.sizes(q, fx["targets"])], "cpu")
    order = torch.cat([torch.arange(q, mask.shape[0]), torch.arange(q)])
    assert torch.equal(mask[order][:, order], dn["attn_mask"])


def test_dino_losses_and_weights(dino_run):
    """Every loss by DINO's name. DINO also logs `loss_xy` / `loss_hw` (unweighted) and, with
    use_dn=False, zeros under the `*_dn` names; this criterion logs a class error per branch."""
    fx, module, _, losses, total, *_ = dino_run
    for name, value in fx["losses"].items():
        if name in losses:
            assert rel_err(losses[name], value) < TOL_OUT, name
        else:
            assert name.startswith(DINO_LOGGED_ONLY) or ("_dn" in name and float(value) == 0), name
    assert {k for k in losses if k not in fx["losses"]} <= {"class_error_dn", "class_error_interm"}
    assert module.criterion.weight_dict == fx["weight_dict"]
    assert rel_err(total, fx["total_loss"]) < TOL_OUT


def test_dino_gradient_norms(dino_run):
    fx, module, *_ = dino_run
    names = official_names(module)
    grads = {names[n]: p.grad for n, p in module.named_parameters() if p.grad is not None}
    for name, (norm, _) in fx["grad_norms"].items():
        if name not in grads:
            # DINO keeps label_enc with use_dn=False, and gives it a zero gradient; this model has
            # none.
            assert name == "label_enc.weight" and norm == 0, name
            continue
        assert abs(grads[name].double().norm() - norm) <= TOL_GRAD * abs(norm), name
    assert set(grads) <= set(fx["grad_norms"])
    for name, expected in fx["grads"].items():
        if name in grads:
            assert rel_err(grads[name], expected) < TOL_GRAD, name


def test_dino_detections(dino_run):
    fx, _, _, _, _, eval_out, detections = dino_run
    for name, value in flatten_outputs(
        {k: fx["eval_outputs"][k] for k in ("pred_logits", "pred_boxes")}
    ).items():
        assert rel_err(flatten_outputs(eval_out)[name], value) < TOL_OUT, name
    assert "enc_outputs" in eval_out and "dn_outputs" not in eval_out
    for det, ref in zip(detections, fx["detections"]):
        assert len(det["labels"]) == 300
        assert torch.equal(det["labels"], ref["labels"])
        assert rel_err(det["scores"], ref["scores"]) < TOL_OUT
        assert rel_err(det["boxes"], ref["boxes"]) < TOL_OUT


# DN-Deformable-DETR (IDEA-Research/DN-DETR @ ff3902a, `main.py -m dn_dab_deformable_detr
# --use_dn`): DN-DETR's own code run on CPU (its PyTorch attention fallback, no .cuda(), ResNet-18
# in the ResNet-50 code path), 2 encoder / 3 decoder layers, FFN 256, 30 queries, dropout 0, two
# images with 3 and 2 GTs, 5 denoising groups; tests/fixtures/generators/dn_deformable_detr.py made
# it and says how. The block draws DN-DETR's own noise (`feed_dn_detr_denoising`). DN-DETR's
# `mask_dict['output_known_lbs_bboxes']` is this model's `dn_outputs`, its `tgt_loss_*[_i]` this
# criterion's `loss_*[_i]_dn`.
@pytest.fixture(scope="module")
def dn_detr_run():
    fx = load_fixture("dn_deformable_detr.pt")
    module = from_official(fixture_state_dict(fx), fx["flags"])
    feed_dn_detr_denoising(module.model.training_queries["dn"], fx)
    return run_fixture(fx, module, fx["targets"])


def test_dn_detr_outputs(dn_detr_run):
    fx, _, outputs, *_ = dn_detr_run
    for stream, expected in (("main", fx["outputs"]), ("dn_outputs", fx["dn_outputs"])):
        ours = outputs if stream == "main" else outputs[stream]
        actual = flatten_outputs({k: ours[k] for k in ("pred_logits", "pred_boxes", "aux_outputs")})
        flat = flatten_outputs(expected)
        assert set(flat) == set(actual)
        for name, value in flat.items():
            assert rel_err(actual[name], value) < TOL_OUT, f"{stream}.{name}"


def test_dn_detr_denoising_queries_and_mask(dn_detr_run):
    fx, module, outputs, *_ = dn_detr_run
    dn, q = fx["dn"], module.model.num_queries
    block = module.model.training_queries["dn"]
    sizes = block.sizes(q, fx["targets"])
    assert sizes == [dn["single_pad"]] * dn["scalar"] and sum(sizes) == dn["pad_size"]
    # DN-DETR hands the decoder its noised boxes as logits clamped at 1e-3, and puts them first.
    expected = torch.sigmoid(dn["input_query_bbox"][:, : dn["pad_size"]])
    torch.testing.assert_close(outputs["dn_outputs"]["init_reference"], expected)
    torch.testing.assert_close(
        outputs["init_reference"], torch.sigmoid(dn["input_query_bbox"][:, dn["pad_size"] :])
    )
    mask = module.model.self_attn_mask([block], [[q], sizes], "cpu")
    order = torch.cat([torch.arange(q, mask.shape[0]), torch.arange(q)])
    assert torch.equal(mask[order][:, order], dn["attn_mask"])


def test_dn_detr_losses_and_weights(dn_detr_run):
    """Every weighted loss by DN-DETR's name; DN-DETR's weight_dict also names `*_enc` terms that a
    single-stage model never makes, and it logs class and cardinality errors (never weighted)."""
    fx, module, _, losses, total, *_ = dn_detr_run
    weighted = {k: w for k, w in fx["weight_dict"].items() if not k.endswith("_enc")}
    assert {dn_detr_loss_name(k): w for k, w in weighted.items()} == module.criterion.weight_dict
    for name in weighted:
        assert rel_err(losses[dn_detr_loss_name(name)], fx["losses"][name]) < TOL_OUT, name
    assert rel_err(total, fx["total_loss"]) < TOL_OUT


def test_dn_detr_gradient_norms(dn_detr_run):
    fx, module, *_ = dn_detr_run
    names = official_names(module)
    grads = {names[n]: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert set(grads) == set(fx["grad_norms"])
    for name, (norm, _) in fx["grad_norms"].items():
        assert abs(grads[name].double().norm() - norm) <= TOL_GRAD * abs(norm), name
    for name, expected in fx["grads"].items():
        assert rel_err(grads[name], expected) < TOL_GRAD, name


def test_dn_detr_detections(dn_detr_run):
    fx, _, _, _, _, eval_out, detections = dn_detr_run
    for name in ("pred_logits", "pred_boxes"):
        assert rel_err(eval_out[name], fx["eval_outputs"][name]) < TOL_OUT, name
    assert "dn_outputs" not in eval_out
    for det, ref in zip(detections, fx["detections"]):
        assert len(det["labels"]) == 100  # DN-DETR's PostProcess: the top 100
        assert torch.equal(det["labels"], ref["labels"])
        assert rel_err(det["scores"], ref["scores"]) < TOL_OUT
        assert rel_err(det["boxes"], ref["boxes"]) < TOL_OUT
