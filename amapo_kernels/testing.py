"""Shared by the tests and the benchmarks: realistic inputs, and memory accounting without a GPU."""

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


def peaked_logits(batch, steps, vocab, *, dtype, generator, device="cpu", temperature=1.0):
    """Logits like a trained LM's, not near-uniform noise: a low-rank hidden state times a random head
    (a few nats of entropy per position) plus a strong preferred token per position."""
    rank = 16
    hidden = torch.randn(batch, steps, rank, generator=generator, dtype=torch.float64)
    head = torch.randn(rank, vocab, generator=generator, dtype=torch.float64) / rank**0.5
    logits = 3.0 * hidden @ head
    top = torch.randint(0, vocab, (batch, steps, 1), generator=generator)
    logits.scatter_add_(-1, top, torch.full((batch, steps, 1), 6.0, dtype=torch.float64))
    return (logits / temperature).to(dtype).to(device)
