"""Train a model: `python train.py [overrides]`. Configuration lives in configs/ (Hydra); see README.md."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig

from cifarlab.runtime import user_errors_exit
from cifarlab.train import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@user_errors_exit
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
