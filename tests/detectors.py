"""Small detectors for tests, composed of parts from a handful of options (what the YAML does)."""
from __future__ import annotations

from torch import nn

from msdetr.models import (AnchorQueries, Backbone, ContrastiveDenoisingQueries, DecoderLayer, DenoisingQueries, DeformableDecoder, DeformableDETR, DeformableEncoder, DINOQueries, EncoderLayer,
                           HybridQueries, LearnedQueries, NMSTwoStageQueries, PositionEmbeddingSine, QueryGroups, TwoStageQueries)


def tiny_detector(backbone: nn.Module | None = None, *, num_classes=5, num_queries=7, hidden_dim=64, nheads=4,
            enc_layers=1, dec_layers=2, dim_feedforward=64, dropout=0.0, num_feature_levels=4, n_points=4,
            two_stage=False, box_refine=False, mixed_selection=False, look_forward_twice=False, pix_trans=False,
            nms_selection=False, cross_attn_first=False, o2m_tap=None, aux_ffn=False, o2m_class_heads=False,
            hybrid_queries=0, query_groups=1, denoising=None, attn_backend="auto", dino=False,
            dab=False) -> DeformableDETR:
    """A detector of tiny defaults; every keyword is one option of one part (`dino`: DINO's detector,
    model=dino: DINOQueries, box query positions, decoder norm, shared heads, temperature 20; `dab`:
    DN-Deformable-DETR's, model=dab_deformable_detr: AnchorQueries with the indicator feature, box query
    positions with DAB's query_scale, box refinement, logit eps 1e-3)."""
    width = dict(d_model=hidden_dim, n_heads=nheads, n_levels=num_feature_levels, n_points=n_points,
                 d_ffn=dim_feedforward, dropout=dropout, attn_backend=attn_backend)
    if dab:
        queries = AnchorQueries(num_queries=num_queries, d_model=hidden_dim, indicator=True)
    elif dino:
        queries = DINOQueries(num_queries=num_queries, d_model=hidden_dim, num_classes=num_classes)
    elif two_stage:
        selection = NMSTwoStageQueries if nms_selection else TwoStageQueries
        queries = selection(num_queries=num_queries, d_model=hidden_dim, mixed_selection=mixed_selection,
                            pix_trans=pix_trans)
    else:
        queries = LearnedQueries(num_queries=num_queries, d_model=hidden_dim)
    blocks = {}
    if hybrid_queries:
        blocks["hybrid"] = HybridQueries(num_queries=hybrid_queries)
    if query_groups > 1:
        blocks["groups"] = QueryGroups(groups=query_groups)
    if denoising == "dn":
        blocks["dn"] = DenoisingQueries(groups=2, seed=0, **(dict(label_book=num_classes, logit_eps=1e-3, indicator=True)
                                                            if dab else {}))
    elif denoising == "cdn":
        blocks["dn"] = ContrastiveDenoisingQueries(max_positives=2, seed=0)  # DINO doubles: 4 groups
    return DeformableDETR(
        backbone=backbone or Backbone(name="resnet18", pretrained=False),
        encoder=DeformableEncoder(layer=EncoderLayer(**width), num_layers=enc_layers),
        decoder=DeformableDecoder(layer=DecoderLayer(**width, cross_attn_first=cross_attn_first, o2m_tap=o2m_tap,
                                                     aux_ffn=aux_ffn),
                                  num_layers=dec_layers, look_forward_twice=look_forward_twice or dino,
                                  box_query_pos=dino or dab, query_scale=dab, norm=dino,
                                  logit_eps=1e-3 if dino or dab else 1e-5),
        queries=queries, num_classes=num_classes, box_refine=box_refine or dino or dab, o2m_class_heads=o2m_class_heads,
        training_queries=blocks, share_heads=dino,
        position_embedding=PositionEmbeddingSine(None, temperature=20, offset=0.0) if dino else None)
