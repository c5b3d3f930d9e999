"""Print the MLflow comparison of runs as a table: `python scripts/compare_runs.py [--sweep ID] [--last N]`.

The table is cifarlab.compare_runs (`--help` says more).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent.parent))

from cifarlab.compare_runs import main

if __name__ == "__main__":
    sys.exit(main())
