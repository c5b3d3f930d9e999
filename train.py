"""Train a model: `python train.py [overrides]`. Configuration lives in configs/ (Hydra); see README.md."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig

from cifarlab.runtime import check_accelerator, user_errors_exit


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@user_errors_exit
def main(cfg: DictConfig) -> float | None:
    # Hydra has checked the overrides and the accelerator is checked before Lightning and MLflow load (~10 s of
    # imports): a typo or a missing GPU is reported at once.
    check_accelerator(cfg.trainer.accelerator)
    from cifarlab.train import train

    return train(cfg)


if __name__ == "__main__":
    main()
