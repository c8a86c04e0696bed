"""Detect objects in an image or a folder: python predict.py ckpt_path=... input=... [score_threshold=0.3]

Writes <output_dir>/detections.json (COCO results: image_id, file_name, category_id, bbox as
x, y, w, h in pixels, score) and <output_dir>/images/<name>.png with the boxes drawn."""
import hydra
from omegaconf import DictConfig

from msdetr.predict import predict


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
