"""python prepare.py experiment=<name> [overrides]; see README.md."""

import hydra
from omegaconf import DictConfig

from mmsuite import console, run

console.quiet()  # known harmless warnings and Lightning's start-up tips (mmsuite/console.py)


@hydra.main(version_base="1.3", config_path="conf", config_name="prepare")
def main(cfg: DictConfig):
    return run.prepare(cfg)


if __name__ == "__main__":
    main()
