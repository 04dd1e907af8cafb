"""``python -m bench.device``: see the package docstring."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the project from this checkout, wherever the command runs from
    sys.path.insert(0, str(ROOT))

from bench.device.harness import main  # noqa: E402

sys.exit(main())
