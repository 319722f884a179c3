"""DPO (Rafailov et al. 2023), with the conservative label smoothing of cDPO (Mitchell 2023)."""

import torch.nn.functional as F

DEFAULTS = {"beta": 0.1, "label_smoothing": 0.0}
LOGPS = "sum"


def needs_reference(hparams) -> bool:
    return True


def pair_losses(chosen, rejected, ref_chosen, ref_rejected, *, beta, label_smoothing):
    logits = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
