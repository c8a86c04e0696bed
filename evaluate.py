"""COCO-evaluate a checkpoint (this project's .ckpt or an official .pth): python evaluate.py experiment=... ckpt_path=..."""
import hydra
from omegaconf import DictConfig

from msdetr.runner import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    return evaluate(cfg).get("AP", 0.0)


if __name__ == "__main__":
    main()
