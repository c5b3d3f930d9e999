"""Retrain on the service's feedback: `FEEDBACK_DIR=/srv/feedback python scripts/retrain.py [tolerance=0.005]`.

Merges the feedback into data/feedback (DVC-tracked), reruns the pipeline (dvc repro), and registers the new model
as `challenger` only if it scores no worse than the `champion` on the same held-out test set; the summary goes to
reports/retrain.json. configs/retrain.yaml holds the settings; cifarlab_lifecycle.retrain the steps.
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent.parent))

import hydra
from omegaconf import DictConfig

from cifarlab.runtime import user_errors_exit
from cifarlab_lifecycle.retrain import retrain


@hydra.main(version_base="1.3", config_path="../configs", config_name="retrain")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    print(retrain(cfg))


if __name__ == "__main__":
    main()
