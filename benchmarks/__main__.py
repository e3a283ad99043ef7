"""`python -m benchmarks --quick | --full [--ops topk,monarch,snell,model] [--out DIR] [--compare OLD.json]`."""

import sys

from .runner import main

sys.exit(main())
