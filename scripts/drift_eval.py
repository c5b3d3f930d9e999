"""How often the drift monitor flags windows of clean and of corrupted test images: a table, and JSON.

    python scripts/drift_eval.py                          # newest runs/*/model.onnx on $CIFAR10_SOURCE's test split
    python scripts/drift_eval.py --model runs/<id>/model.onnx --prepared data/prepared/cifar10-jpg
    python scripts/drift_eval.py --quick                  # the committed sample (1,000 test images)

The evaluation is cifarlab.drift_eval (`--help` says more).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent.parent))

from cifarlab.drift_eval import main
from cifarlab.runtime import user_errors_exit

if __name__ == "__main__":
    sys.exit(user_errors_exit(main)())
