"""Train a model: `python train.py [overrides]`. Configuration lives in configs/ (Hydra); see README.md."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from cifarlab.runtime import user_errors_exit  # noqa: E402
from cifarlab.train import train  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@user_errors_exit
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
