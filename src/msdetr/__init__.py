"""msdetr: DETR-family detectors (Deformable-DETR, MS-DETR, DETA) on one code path."""

__version__ = "0.1.0"
