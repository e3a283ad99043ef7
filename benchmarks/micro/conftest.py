import os

import torch

# Without a GPU the Triton kernels run interpreted; the variable must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # One thread: stable CPU timings on a shared machine.
    torch.set_num_threads(1)
