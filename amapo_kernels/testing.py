"""Shared by the tests and the benchmarks: realistic inputs, and memory accounting without a GPU."""

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LargestTensor(TorchDispatchMode):
    """While active, records the largest tensor any op allocates (forward and backward alike):
    `largest_numel` elements and `largest_bytes` bytes. Views of an op's inputs allocate nothing and
    are not counted."""

    def __init__(self):
        super().__init__()
        self.largest_numel = 0
        self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _storage(t) not in inputs:
                self.largest_numel = max(self.largest_numel, t.numel())
                self.largest_bytes = max(self.largest_bytes, t.numel() * t.element_size())
        return out


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def peaked_logits(batch, steps, vocab, *, dtype, generator, device="cpu", temperature=1.0):
    """Logits like a trained LM's, not near-uniform noise: at each position a preferred token holds about
    2/3 of the probability and the rest is spread, 2.5-4 nats of entropy for V = 4096-128256 (checked by
    tests/test_realistic_inputs.py). The rest: a low-rank hidden state times a random head, logits of std about 2;
    the preferred token: log V + 3 above their mean, so that its share, about e^3 / (e^3 + e^(std^2 / 2)) (the
    log-partition of V Gaussian logits is log V + std^2 / 2), does not depend on V. (An earlier version added
    6 to logits of std 3: at V = 128256 the preferred token held 0.2% and the entropy was 7.5 nats.)"""
    rank = 16
    hidden = torch.randn(batch, steps, rank, generator=generator, dtype=torch.float64)
    head = torch.randn(rank, vocab, generator=generator, dtype=torch.float64) / rank**0.5
    logits = 2.0 * hidden @ head
    top = torch.randint(0, vocab, (batch, steps, 1), generator=generator)
    boost = torch.full((batch, steps, 1), math.log(vocab) + 3.0, dtype=torch.float64)
    logits.scatter_add_(-1, top, boost)
    return (logits / temperature).to(dtype).to(device)
