"""Compare a challenger variant with the champion on the service's feedback, and recommend what to do.

    python scripts/ab_report.py --feedback $FEEDBACK_DIR [--metrics-url http://127.0.0.1:8000/metrics]
        [--json report.json] [--promote]

The report and its statistics are cifarlab_lifecycle.abreport and cifarlab_lifecycle.abtest (`--help` says more).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent.parent))

from cifarlab.runtime import user_errors_exit
from cifarlab_lifecycle.abreport import main

if __name__ == "__main__":
    sys.exit(user_errors_exit(main)())
