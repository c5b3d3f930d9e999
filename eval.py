"""Evaluate a checkpoint or an ONNX model on the test set: `python eval.py onnx_path=runs/<run id>/model.onnx`."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig

from cifarlab.runtime import user_errors_exit


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
@user_errors_exit
def main(cfg: DictConfig) -> dict[str, float]:
    from cifarlab.evaluate import evaluate  # after Hydra has checked the overrides: a typo is reported at once

    return evaluate(cfg)


if __name__ == "__main__":
    main()
