"""`python -m benchmarks --quick | --full [--ops topk,monarch,snell,model] [--out DIR] [--compare OLD.json]`."""

import os
import sys

from .runner import main

code = main()
# Every result is written by now. Leave without the interpreter's exit handlers: after a
# torch.compile'd provider, inductor's compile-worker pool can hold the exit for minutes
# (pytorch/pytorch#162199), which on a device call spends the time of later steps.
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
