import os

import torch

# without a GPU, Triton kernels run in the interpreter; it must be chosen before triton loads
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
