"""Detect objects in an image or a folder: python predict.py ckpt_path=... input=...
    [score_threshold=0.3]

Writes <output_dir>/detections.json (COCO results: image_id, file_name, category_id, bbox as
x, y, w, h in pixels, clipped to the image, score) at the end, <output_dir>/detections.jsonl (one
line per image, as it goes) and <output_dir>/images/<file name>.png (a.jpg -> a.jpg.png) with the
boxes drawn. Unreadable files are named and skipped. Images are resized as the checkpoint's run
evaluated them unless eval_size= / max_size= are given."""

import hydra
from omegaconf import DictConfig

from msdetr.config_schema import validate


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    validate(cfg)  # a wrong type or range stops here, in one sentence
    # Imported only now: msdetr.predict loads torch, Lightning and the models, which a config
    # mistake should not have to wait for.
    from msdetr.errors import one_sentence
    from msdetr.predict import predict

    # known bad input: one sentence, no traceback (HYDRA_FULL_ERROR=1 shows it)
    with one_sentence():
        predict(cfg)


if __name__ == "__main__":
    main()
