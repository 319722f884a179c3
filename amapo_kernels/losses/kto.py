"""KTO (Ethayarajh et al. 2024), paired form: each chosen response is a desirable example and each
rejected one an undesirable example; the reference point z is the detached batch-mean log-ratio of the
other half, clamped at 0 (as the paired variant of the KTO and alpha-DPO trainers), over the pairs of every
rank of `group` (the world when torch.distributed is initialized), as KTO's and TRL's trainers gather it from
every process. The loss is the mean over the 2B examples, as in the KTO paper and TRL: a pair contributes
half the sum of its two terms."""

import torch
import torch.nn.functional as F

from amapo_kernels import batch_statistics
from amapo_kernels._checks import NON_NEGATIVE, POSITIVE

DEFAULTS = {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}
RULES = {"beta": POSITIVE, "desirable_weight": NON_NEGATIVE, "undesirable_weight": NON_NEGATIVE}
BATCH_STATISTICS = True  # takes group=: the reference points are over the pairs of every rank
LOGPS = "sum"


def needs_reference(hparams) -> bool:
    return True


def _one_minus_sigmoid(x):
    # exp(logsigmoid(-x)): value and gradient stay accurate in both tails (sigmoid's own backward,
    # y * (1 - y), cancels once y nears 1)
    return torch.exp(F.logsigmoid(-x))


def pair_losses(chosen, rejected, ref_chosen, ref_rejected, *, beta, desirable_weight, undesirable_weight,
                group=None):
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    z_chosen = batch_statistics.mean(chosen_ratio, group).clamp(min=0).to(chosen.dtype)  # detached
    z_rejected = batch_statistics.mean(rejected_ratio, group).clamp(min=0).to(chosen.dtype)
    desirable = _one_minus_sigmoid(beta * (chosen_ratio - z_rejected))
    undesirable = _one_minus_sigmoid(beta * (z_chosen - rejected_ratio))
    return (desirable_weight * desirable + undesirable_weight * undesirable) / 2
