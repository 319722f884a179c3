"""SimPO (Meng et al. 2024): reference-free, length-normalized log-probs, a constant target margin
gamma (the official config stores gamma / beta; gamma here is the margin itself)."""

import torch.nn.functional as F

DEFAULTS = {"beta": 2.0, "gamma": 1.0, "label_smoothing": 0.0}
LOGPS = "mean"


def needs_reference(hparams) -> bool:
    return False


def pair_losses(chosen, rejected, ref_chosen, ref_rejected, *, beta, gamma, label_smoothing):
    logits = beta * (chosen - rejected) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
