"""The benchmarks' and tests' "realistic, peaked" logits (amapo_kernels.testing.peaked_logits) are what they
claim: a few nats of entropy per position and a preferred token that holds most of the probability, at
every vocabulary size the benchmarks use. (The first version, at V = 128256, gave 7.5 nats, and its
preferred token held 0.2% of the probability.)"""

import math

import pytest
import torch

from amapo_kernels.testing import peaked_logits


@pytest.mark.parametrize("vocab", [4096, 32000, 128256])
def test_peaked_logits_are_peaked(vocab):
    generator = torch.Generator().manual_seed(0)
    logits = peaked_logits(2, 64, vocab, dtype=torch.float32, generator=generator).double()
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    top = logp.max(-1).values.exp()
    assert 2.0 <= entropy.mean().item() <= 4.5, entropy.mean()
    assert entropy.mean().item() < 0.4 * math.log(vocab)  # far from uniform
    assert 0.5 <= top.mean().item() <= 0.8, top.mean()
