"""FocalPO (Liu et al. 2025): the DPO loss weighted by p**gamma, p = sigmoid(DPO logit), so that pairs
already ranked right weigh more. p**gamma is computed as exp(gamma * logsigmoid) for stability."""

import torch
import torch.nn.functional as F

DEFAULTS = {"beta": 0.1, "gamma": 0.05}
LOGPS = "sum"


def needs_reference(hparams) -> bool:
    return True


def pair_losses(chosen, rejected, ref_chosen, ref_rejected, *, beta, gamma):
    log_p = F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))
    return -torch.exp(gamma * log_p) * log_p
