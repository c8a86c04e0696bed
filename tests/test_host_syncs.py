"""No needless host-device synchronisation in the model, the criterion and the post-processing.

(a) Under FakeTensorMode every tensor is a fake on a fake `cuda` device (no GPU needed): any
    data-dependent host read (`.item()`, `.tolist()`, `nonzero`, a boolean mask index) raises, and
    so does an op mixing CPU and CUDA tensors. The model (training and eval forward), the criterion
    and the post-processing run under it. The few intended host steps are stubbed, each one named
    method: the Hungarian solve (`HungarianMatcher.solve_on_host`), the one-to-many cap draw
    (`QualityTopKAssigner.select_on_host`), the merged-assignment sizes
    (`SetCriterion.counts_on_host`), DETA's NMS proposal selection
    (`NMSTwoStageQueries.select`) and the image sizes of the inference mask paste
    (`PostProcess.sizes_on_host`). The autograd engine needs a real device for CUDA tensors, so the
    backward runs under the same mode on fake CPU tensors instead (which still rejects every
    data-dependent read).
(b) A TorchDispatchMode counts the syncs a real CPU run would make on a GPU: the criterion makes the
    same number for 2 or 6 layers and 1 or 3 images, DETA's post-processing the same for batch 2 and
    4.
"""

from __future__ import annotations

import collections
from functools import partial

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers.detectors import tiny_detector
from helpers.syncs import (
    NUM_CLASSES,
    SyncCounter,
    ms_detr_branches,
    synthetic_ms_detr_outputs,
)
from msdetr.losses import Branch, SetCriterion
from msdetr.matching import (
    DenoisingAssigner,
    HungarianMatcher,
    IoUTopKAssigner,
    QualityTopKAssigner,
)
from msdetr.models import NMSTwoStageQueries, TwoStageQueries
from msdetr.models.attention import MSDeformAttn
from msdetr.postprocess import NMSPostProcess, PostProcess, TopKPostProcess


def deta_branches(seed=0):
    return [
        Branch("main", IoUTopKAssigner(seed=seed), assign_once=True),
        Branch(
            "enc_outputs",
            IoUTopKAssigner(
                box_key="anchors",
                threshold=0.7,
                ignore_below=0.3,
                sample_size=256,
                positive_fraction=0.5,
                seed=seed,
            ),
            suffix="_enc",
            aux=False,
            binary=True,
        ),
    ]


def mask_branches(seed=0):
    """MS-DETR's branches with masks on both decoder streams and Mask DINO's matching costs."""
    hungarian = HungarianMatcher(cost_mask=5.0, cost_dice=5.0, num_points=50)
    main, o2m, enc = ms_detr_branches(seed)
    return [
        Branch("main", hungarian, masks=True),
        Branch(o2m.stream, o2m.assigner, suffix="_o2m", merge_with="main", masks=True),
        enc,
    ]


TWO_STAGE = "model=deformable_detr_two_stage_refine"
BLOCKS = "model.detector.training_queries."
# Each case: how its tiny detector is built (helpers.detectors; 5 classes) and its branches.
CASES = {
    "ms_detr": (
        partial(tiny_detector, "model=deformable_detr_pp", "matcher=ms_detr"),
        ms_detr_branches,
    ),
    "one_stage_o2m": (
        partial(
            tiny_detector,
            "model.detector.box_refine=true",
            "model.detector.decoder.layer.o2m_tap=output",
        ),
        ms_detr_branches,
    ),
    "h_detr": (
        partial(tiny_detector, TWO_STAGE, "matcher=h_detr", BLOCKS + "hybrid.num_queries=5"),
        lambda: [
            Branch("main", HungarianMatcher()),
            Branch("hybrid_outputs", HungarianMatcher(), suffix="_one2many", repeat_targets=2),
        ],
    ),
    "dino": (
        partial(tiny_detector, "model=dino", "matcher=dino", BLOCKS + "dn.max_positives=2"),
        lambda: [
            Branch("main", HungarianMatcher(giou_eps=1e-6)),
            Branch(
                "dn_outputs", DenoisingAssigner(contrastive=True), suffix="_dn", suffix_first=True
            ),
            Branch("enc_outputs", HungarianMatcher(giou_eps=1e-6), suffix="_interm", aux=False),
        ],
    ),
    "dn_detr": (
        partial(tiny_detector, "experiment=dn_deformable_detr_50ep", BLOCKS + "dn.groups=2"),
        lambda: [
            Branch("main", HungarianMatcher(giou_eps=1e-6)),
            Branch("dn_outputs", DenoisingAssigner(padding="ignore"), suffix="_dn"),
        ],
    ),
    "deta": (partial(tiny_detector, "model=deta"), deta_branches),
    # The mask head on MS-DETR: the stride-4 backbone map, the pixel embedding, every layer's mask
    # embeddings, the mask losses, the matching's mask costs and the kept detections' masks.
    "ms_detr_masks": (
        partial(
            tiny_detector,
            "model=deformable_detr_pp",
            "matcher=ms_detr",
            "+parts=mask_head",
            "matcher.mask_points=50",
        ),
        mask_branches,
    ),
}
WITH_MASKS = {"ms_detr_masks"}


# ---------------------------------------------------------------------------------------------
# (a) FakeTensorMode on a fake CUDA device


def _solve_stub(flat, shapes):
    return [(np.arange(min(r, c)), np.arange(min(r, c))) for r, c in shapes]


def _select_stub(host, specs):
    return [np.arange(min(s.k, s.num_gt * s.k), dtype=np.int64) for s in specs]


def _counts_stub(counts):
    return [1] * counts.shape[0]


def _proposals_stub(self, enc_class, enc_coord_unact, level_ids, k, shapes=None):
    # NMS keeps a data-dependent number of boxes: the one host step of the model. A fixed-size
    # stand-in with the same output (B, k) lets everything around it run fake.
    return TwoStageQueries.select(self, enc_class, enc_coord_unact, level_ids, k, shapes)


@pytest.fixture
def host_steps_stubbed(monkeypatch):
    monkeypatch.setattr(HungarianMatcher, "solve_on_host", staticmethod(_solve_stub))
    monkeypatch.setattr(QualityTopKAssigner, "select_on_host", staticmethod(_select_stub))
    monkeypatch.setattr(SetCriterion, "counts_on_host", staticmethod(_counts_stub))
    monkeypatch.setattr(NMSTwoStageQueries, "select", _proposals_stub)
    monkeypatch.setattr(PostProcess, "sizes_on_host", staticmethod(_sizes_stub))


def _sizes_stub(orig_sizes):
    return [(64, 80), (32, 40)][: orig_sizes.shape[0]]


def fake_model(mode: FakeTensorMode, model: torch.nn.Module, device: str) -> torch.nn.Module:
    """The model's parameters and buffers as fakes on `device`.

    Building the module inside the mode does not work (nn.init's in-place initialisers run in a
    fake mode of their own and refuse ours), so the model is built for real on the CPU, then every
    tensor is converted with `mode.from_tensor` (a fake CPU tensor of the same mode) and moved with
    `.to(device)` inside the mode; moving a fake needs no device at all. With the future flag the
    module takes the new Parameter objects instead of assigning `.data` of the real ones."""
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        with mode:
            model._apply(lambda t: mode.from_tensor(t).to(device))
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
    return model


def fake_batch(device: str, num_images=2, h=64, w=80, masks=False):
    images = torch.randn(num_images, 3, h, w, device=device)
    mask = torch.zeros(num_images, h, w, dtype=torch.bool, device=device)
    mask[-1, h // 2 :, :] = True
    mask[-1, :, w // 2 :] = True
    targets = [
        {
            "labels": torch.randint(0, NUM_CLASSES, (n,), device=device),
            "boxes": torch.rand(n, 4, device=device) * 0.5 + 0.25,
        }
        for n in (2, 3, 0, 1)[:num_images]
    ]
    if masks:  # at each image's unpadded size (the last one is padded to half its size)
        for i, t in enumerate(targets):
            size = (h, w) if i < num_images - 1 else (h // 2, w // 2)
            t["masks"] = torch.rand(len(t["labels"]), *size, device=device) > 0.5
    return images, mask, targets


def run_fake_step(case: str, device: str, backend: str = "auto", backward: bool = False):
    detector, branches = CASES[case]
    mode = FakeTensorMode()
    model = fake_model(mode, detector(), device)
    model.set_attn_backend(backend)
    criterion = SetCriterion(NUM_CLASSES, branches())
    with mode:
        images, mask, targets = fake_batch(device, masks=case in WITH_MASKS)
        out = model(images, mask, targets)  # the denoising queries are built from the targets
        criterion.check_model(model.output_streams)
        losses = criterion(out, targets)
        total = criterion.total(losses)
        assert total.device.type == device and isinstance(total, torch.Tensor)
        if backward:
            total.backward()
            grads = [p.grad for p in model.parameters() if p.requires_grad]
            assert any(g is not None for g in grads) and all(
                g.device.type == device for g in grads if g is not None
            )
        model.eval()
        out = model(images, mask)
        sizes = torch.tensor([[64, 80], [32, 40]], device=device)
        post = TopKPostProcess(10)(out, sizes)
        assert post[0]["boxes"].shape == (10, 4) and post[0]["boxes"].device.type == device
        if case in WITH_MASKS:
            assert post[1]["masks"].shape == (10, 32, 40) and post[1]["masks"].device.type == device
            assert {"loss_mask", "loss_dice_0_o2m"} <= set(losses)
    return losses


def test_there_is_no_gpu_here():
    # The fake-CUDA tests below are meant to run (and do run) on machines without one.
    if torch.cuda.is_available():
        pytest.skip(
            "a GPU is present; the fake tests still run, this only documents the CPU-only set-up"
        )
    with FakeTensorMode():
        assert torch.empty(2, device="cuda").device.type == "cuda"


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_criterion_and_eval_run_on_fake_cuda(case, host_steps_stubbed):
    losses = run_fake_step(case, "cuda")
    assert all(v.device.type == "cuda" for v in losses.values())


def test_reference_attention_runs_on_fake_cuda(host_steps_stubbed):
    # "auto" picks the Triton op on CUDA (its registered fake runs here); the reference path must be
    # free of host reads on CUDA tensors too.
    run_fake_step("ms_detr", "cuda", backend="reference")


@pytest.mark.parametrize("case", ["ms_detr", "deta", "ms_detr_masks"])
def test_training_step_with_backward_runs_on_fake_cpu(case, host_steps_stubbed):
    # The attention a GPU runs has no host read in its backward; on the CPU "auto" is the gather
    # formulation, whose index grouping (nonzero) is host work by design, so the reference stands
    # in.
    run_fake_step(case, "cpu", backend="reference", backward=True)


@pytest.mark.parametrize("fault", ["item", "tolist", "nonzero", "mask_index", "cpu_mix"])
def test_fake_step_catches_an_inserted_sync(fault, host_steps_stubbed, monkeypatch):
    """The harness has teeth: one sync (or device mix) inserted in the attention makes it fail."""
    forward = MSDeformAttn.forward

    def faulty(self, query, *args, **kwargs):
        if fault == "item":
            query = query * query.abs().max().item()
        elif fault == "tolist":
            query = query * len(query.flatten()[:3].tolist())
        elif fault == "nonzero":
            query = query + torch.nonzero(query > 0).shape[0]
        elif fault == "mask_index":
            query = query + query[query > 0].sum()
        else:
            query = query + torch.ones(query.shape[-1])  # a CPU tensor, not a scalar
        return forward(self, query, *args, **kwargs)

    monkeypatch.setattr(MSDeformAttn, "forward", faulty)
    with pytest.raises(Exception) as info:
        run_fake_step("ms_detr", "cuda")
    assert not isinstance(info.value, AssertionError) or "device" in str(info.value)


def test_proposal_nms_selection_is_the_one_stubbed_step():
    """Without the stub DETA's NMS selection is the (allowed) data-dependent step of the model."""
    detector, _ = CASES["deta"]
    mode = FakeTensorMode()
    model = fake_model(mode, detector(), "cuda")
    model.eval()
    with mode, pytest.raises(Exception, match="(?i)dynamic|data.dependent|nonzero|nms"):
        model(*fake_batch("cuda")[:2])


# ---------------------------------------------------------------------------------------------
# (b) counting syncs on the CPU


def criterion_syncs(num_layers: int, num_images: int) -> collections.Counter:
    criterion = SetCriterion(NUM_CLASSES, ms_detr_branches())
    outputs, targets = synthetic_ms_detr_outputs(num_layers, num_images)
    with SyncCounter() as counter:
        losses = criterion(outputs, targets)
    assert len(losses) > 0
    return counter.counts


def _with_mask_outputs(outputs: dict, targets: list[dict], seed=0, dim=8, size=(12, 16)):
    """The synthetic MS-DETR outputs with a mask head's keys on every decoder layer (not on the
    encoder stream), and the targets with masks at their images' unpadded sizes."""
    g = torch.Generator().manual_seed(seed)
    b = outputs["pred_logits"].shape[0]
    features = torch.randn(b, dim, *size, generator=g)
    ratio = torch.rand(b, 2, generator=g) * 0.5 + 0.5
    for stream in (outputs, outputs["o2m_outputs"]):
        for layer in (*stream["aux_outputs"], stream):
            q = layer["pred_logits"].shape[1]
            layer["mask_embed"] = torch.randn(b, q, dim, generator=g)
            layer["mask_features"], layer["mask_valid_ratio"] = features, ratio
    targets = [
        {**t, "masks": torch.rand(len(t["labels"]), 20, 24, generator=g) > 0.5} for t in targets
    ]
    return outputs, targets


def test_the_counter_sees_syncs():
    x = torch.randn(5)
    with SyncCounter() as counter:
        x.sum().item()
        x.tolist()
        torch.nonzero(x > 0)
        x[x > 0]
        h = x.cpu()
        h.tolist()  # a host copy: reading it is free
        torch.randperm(4)[:2].tolist()  # a host draw: free as well
    assert counter.counts == {
        "aten._local_scalar_dense": 1,
        "tolist": 1,
        "aten.nonzero": 1,
        "boolean index": 1,
        "copy to host": 1,
    }


def test_criterion_syncs_are_constant_in_layers_and_images():
    counts = {
        (layers, images): criterion_syncs(layers, images)
        for layers, images in [(2, 1), (6, 2), (6, 3), (2, 3)]
    }
    reference = counts[(6, 2)]
    assert all(c == reference for c in counts.values()), counts
    # One host copy per step each: the Hungarian costs, the one-to-many positives, the merge sizes.
    assert reference == {"copy to host": 3}, reference


def test_mask_losses_and_costs_add_no_syncs():
    """The mask terms of both decoder branches and the Hungarian mask costs: still one host copy
    each for the costs, the one-to-many positives and the merge sizes, at 2 or 6 layers."""
    for layers, images in [(2, 3), (6, 2)]:
        criterion = SetCriterion(NUM_CLASSES, mask_branches(), mask_num_points=40)
        outputs, targets = _with_mask_outputs(*synthetic_ms_detr_outputs(layers, images))
        with SyncCounter() as counter:
            losses = criterion(outputs, targets)
        assert {"loss_mask", "loss_dice", f"loss_mask_{layers - 2}_o2m"} <= set(losses)
        assert counter.counts == {"copy to host": 3}, counter.counts


def _deta_outputs(num_images: int, q=300, c=NUM_CLASSES, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_images, q, c, generator=g)
    boxes = torch.rand(num_images, q, 4, generator=g) * 0.5 + 0.25
    sizes = torch.randint(200, 800, (num_images, 2), generator=g)
    return {"pred_logits": logits, "pred_boxes": boxes}, sizes


def nms_postprocess_syncs(num_images: int) -> collections.Counter:
    outputs, sizes = _deta_outputs(num_images)
    with SyncCounter() as counter:
        # whole_batch: what runs on a GPU (on the CPU the default is the per-image loop)
        NMSPostProcess(num_select=100, pre_topk=1000, whole_batch=True)(outputs, sizes)
    return counter.counts


def test_nms_postprocess_syncs_do_not_grow_with_the_batch():
    counts = {b: nms_postprocess_syncs(b) for b in (1, 2, 4)}
    assert counts[1] == counts[2] == counts[4], counts
    assert counts[2] == {"torchvision.nms": 1, "copy to host": 1}, counts[2]


# ---------------------------------------------------------------------------------------------
# Batched post-processing: the same detections as the per-image loop it replaced


def _greedy_nms(pp: NMSPostProcess, outputs, orig_sizes):
    """The rule written out: per image, candidates (the pre_topk best pairs) from the highest score
    down, equal scores by candidate position; a candidate is kept unless a kept box of its class
    overlaps it by more than the threshold (IoU in float64)."""
    from torchvision.ops import box_iou

    from msdetr.box_ops import cxcywh_to_xyxy

    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    b, q, c = logits.shape
    scores = logits.float().sigmoid().view(b, -1)
    h, w = orig_sizes.to(torch.float32).unbind(1)
    boxes = cxcywh_to_xyxy(boxes.float()) * torch.stack([w, h, w, h], 1)[:, None, :]
    results = []
    for i in range(b):
        idx = scores[i].topk(pp.pre_topk).indices if q * c > pp.pre_topk else torch.arange(q * c)
        label, box, score = idx % c, boxes[i, idx // c], scores[i, idx]
        iou = box_iou(box.double(), box.double())
        kept: list[int] = []
        for j in sorted(range(len(idx)), key=lambda j: (-score[j].item(), j)):
            if all(label[k] != label[j] or iou[k, j] <= pp.iou_threshold for k in kept):
                kept.append(j)
        keep = torch.tensor(kept[: pp.num_select], dtype=torch.long)
        results.append({"scores": score[keep], "labels": label[keep], "boxes": box[keep]})
    return results


@pytest.mark.parametrize("whole_batch", [True, False])
@pytest.mark.parametrize("trial", range(12))
def test_batched_nms_postprocess_matches_the_per_image_loop(trial, whole_batch):
    g = torch.Generator().manual_seed(trial)
    b, q, c = (1, 2, 3, 4)[trial % 4], (10, 40, 120)[trial % 3], (3, 7, 20)[trial % 3]
    logits = torch.randn(b, q, c, generator=g)
    if trial % 2:
        logits = torch.round(logits * 2) / 2  # many equal scores
    boxes = torch.rand(b, q, 4, generator=g) * 0.5 + 0.25
    if trial % 3 == 1:
        boxes[:, q // 2 :] = boxes[:, : q - q // 2]  # duplicate boxes (IoU exactly 1)
    sizes = torch.randint(100, 900, (b, 2), generator=g)
    # pre_topk below q * c in some trials; q * c above 1000 in others (torchvision's class-by-class
    # regime)
    pp = NMSPostProcess(
        num_select=(5, 50, 300)[trial % 3],
        pre_topk=(60, 10000, 500)[trial % 3],
        whole_batch=whole_batch,
    )
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    for got, want in zip(pp(outputs, sizes), _greedy_nms(pp, outputs, sizes), strict=True):
        for key in ("scores", "labels", "boxes"):
            assert torch.equal(got[key], want[key]), key


def test_batched_nms_postprocess_on_empty_inputs():
    outputs = {"pred_logits": torch.zeros(2, 0, 3), "pred_boxes": torch.zeros(2, 0, 4)}
    for whole_batch in (True, False):
        results = NMSPostProcess(whole_batch=whole_batch)(
            outputs, torch.tensor([[10, 10], [20, 20]])
        )
        assert len(results) == 2 and all(r["boxes"].shape == (0, 4) for r in results)


# ---------------------------------------------------------------------------------------------
# Python shapes instead of reading the device tensor


def test_ms_deform_attn_takes_python_shapes():
    from msdetr.kernels import ms_deform_attn

    shapes = [(4, 5), (2, 3)]
    spatial_shapes = torch.tensor(shapes)
    starts = torch.tensor([0, 20])
    value = torch.randn(2, 26, 2, 4)
    loc = torch.rand(2, 3, 2, 2, 2, 2)
    weights = torch.rand(2, 3, 2, 2, 2)
    expected = ms_deform_attn(value, spatial_shapes, starts, loc, weights, backend="reference")
    got = ms_deform_attn(
        value, spatial_shapes, starts, loc, weights, backend="reference", shapes=shapes
    )
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="shapes=.*tokens"):
        ms_deform_attn(value, spatial_shapes, starts, loc, weights, shapes=[(4, 5), (2, 2)])


def test_proposal_nms_selection_with_python_shapes_matches_level_ids():
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 10), (4, 5), (2, 3), (1, 2)]
    tokens = sum(h * w for h, w in shapes)
    enc_class = torch.round(torch.randn(2, tokens, 2, generator=g))  # ties
    coord = torch.randn(2, tokens, 4, generator=g) * 0.3
    level_ids = torch.cat([torch.full((h * w,), lvl) for lvl, (h, w) in enumerate(shapes)])
    selection = NMSTwoStageQueries(
        num_queries=30, d_model=8, pre_nms_per_level=20, iou_threshold=0.5
    )
    with SyncCounter() as counter:
        picks = selection.select(enc_class, coord, level_ids, 30, shapes)
    assert torch.equal(picks, selection.select(enc_class, coord, level_ids, 30))
    assert picks.shape == (2, 30)
    assert set(counter.counts) == {"torchvision.nms"}  # one NMS per image, nothing else read back
