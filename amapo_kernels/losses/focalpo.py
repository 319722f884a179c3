"""FocalPO (Liu et al. 2025): the DPO loss weighted by p**gamma, p = sigmoid(DPO logit), so that pairs
already ranked right weigh more. p**gamma is computed as exp(gamma * logsigmoid) for stability."""

import torch
import torch.nn.functional as F

from amapo_kernels._checks import NON_NEGATIVE, POSITIVE

DEFAULTS = {"beta": 0.1, "gamma": 0.05}
RULES = {"beta": POSITIVE, "gamma": NON_NEGATIVE}
LOGPS = "sum"


def needs_reference(hparams) -> bool:
    return True


def pair_losses(chosen, rejected, ref_chosen, ref_rejected, *, beta, gamma):
    log_p = F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))
    if gamma == 0:
        return -log_p  # DPO
    # p -> 0 (a log-prob of -inf): p**gamma * log(p) -> 0, value and gradient; computed on a finite stand-in
    # so that neither the value nor the gradient becomes 0 * inf = NaN. Only -inf: a NaN stays NaN.
    vanishing = log_p == float("-inf")
    safe = torch.where(vanishing, torch.zeros_like(log_p), log_p)
    return torch.where(vanishing, torch.zeros_like(log_p), -torch.exp(gamma * safe) * safe)
