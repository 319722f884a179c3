"""Memory accounting without a GPU: the largest tensor any op creates, for tests and CPU benchmarks."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestTensor(TorchDispatchMode):
    """While active, records the largest tensor any op returns (forward and backward alike):
    `largest_numel` elements and `largest_bytes` bytes."""

    def __init__(self):
        super().__init__()
        self.largest_numel = 0
        self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest_numel = max(self.largest_numel, t.numel())
                self.largest_bytes = max(self.largest_bytes, t.numel() * t.element_size())
        return out
