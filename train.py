"""Train a detector: python train.py [experiment=...] [model=...] [matcher=...] [schedule=...] [key=value]."""
import hydra
from omegaconf import DictConfig

from msdetr.runner import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    metrics = train(cfg)
    return metrics.get("AP", 0.0)  # the value a Hydra sweeper optimizes


if __name__ == "__main__":
    main()
