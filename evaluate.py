"""COCO-evaluate a checkpoint (this project's .ckpt or an official .pth): python evaluate.py
experiment=... ckpt_path=..."""

import hydra
from omegaconf import DictConfig

from msdetr.config_schema import validate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    validate(cfg)  # a wrong type or range stops here, in one sentence
    # Imported only now: msdetr.run loads Lightning and the models (10-20 s), which a config
    # mistake should not have to wait for.
    from msdetr.errors import one_sentence
    from msdetr.run import evaluate

    # known bad input: one sentence, no traceback (HYDRA_FULL_ERROR=1 shows it)
    with one_sentence():
        return evaluate(cfg).get("AP", 0.0)


if __name__ == "__main__":
    main()
