"""Promote the registry's challenger to champion if it beats it: `python scripts/promote.py [margin=0.01]`.

Both versions are evaluated on the same test data (configs/promote.yaml composes eval.yaml); the decision is
printed and recorded as tags on the challenger version. See cifarlab_lifecycle.promotion.
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent.parent))

import hydra
from omegaconf import DictConfig

from cifarlab.runtime import user_errors_exit
from cifarlab_lifecycle.promotion import promote


@hydra.main(version_base="1.3", config_path="../configs", config_name="promote")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    decision = promote(cfg)
    print(decision.describe(cfg.model_name, cfg.metric, cfg.margin))


if __name__ == "__main__":
    main()
