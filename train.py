"""Train a detector: python train.py [experiment=...] [model=...] [matcher=...] [schedule=...]
[key=value]."""

import hydra
from omegaconf import DictConfig

from msdetr.config_schema import validate


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    validate(cfg)  # a wrong type or range stops here, in one sentence
    # Imported only now: msdetr.run loads Lightning and the models (10-20 s), which a config
    # mistake should not have to wait for.
    from msdetr.errors import one_sentence
    from msdetr.run import optimized_value, train

    # known bad input: one sentence, no traceback (HYDRA_FULL_ERROR=1 shows it)
    with one_sentence():
        metrics = train(cfg)
    return optimized_value(cfg, metrics)  # the value a Hydra sweeper optimizes (optimized_metric)


if __name__ == "__main__":
    main()
