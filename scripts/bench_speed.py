"""Training speed: the template's own path against a minimal raw PyTorch loop, on the same device, in one run.

    python scripts/bench_speed.py --quick        # minutes on 2 CPU cores; last line: the template/raw ratio

The benchmark is benchmarks/training/bench_speed.py (`--help` says more); this is its command.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, where benchmarks/ lives

from benchmarks.training.bench_speed import main

if __name__ == "__main__":
    main()
