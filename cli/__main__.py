"""``python -m cli ARGS`` is ``mae ARGS`` (what torchrun launches: ``torchrun ... -m cli pretrain ...``)."""

import sys

from cli.main import main

sys.exit(main())
