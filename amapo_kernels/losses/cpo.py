"""CPO (Xu et al. 2024): reference-free sigmoid preference term plus the NLL of the chosen response,
per pair (the authors' trainer instead adds one token-mean NLL over the batch's chosen tokens)."""

import torch.nn.functional as F

DEFAULTS = {"beta": 0.1, "nll_weight": 1.0}
LOGPS = "sum"


def needs_reference(hparams) -> bool:
    return False


def pair_losses(chosen, rejected, ref_chosen, ref_rejected, *, beta, nll_weight):
    return -F.logsigmoid(beta * (chosen - rejected)) - nll_weight * chosen
