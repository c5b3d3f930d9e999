"""Cut the committed sample out of a CIFAR-10 image folder (cifarlab.data.sample; `--help` says more).

    python scripts/make_sample.py --source cifar10-jpg.tar.gz --out data/cifar10-sample.tar.gz \
        --train-per-class 400 --test-per-class 100
"""

import sys
from pathlib import Path

try:
    import cifarlab  # noqa: F401
except ImportError:  # a checkout without `make venv`: the package is its src/ folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cifarlab.data.sample import main

if __name__ == "__main__":
    sys.exit(main())
