"""SLiC-HF (Zhao et al. 2023). form="rank" (default): the rank calibration hinge plus the NLL of the
chosen response, max(0, delta - (lc - lr)) - nll_weight * lc. form="hinge": the reference-based hinge
of the AMaPO paper's Table 6, max(0, 1 - tau * h), which needs reference log-probs."""

import torch

DEFAULTS = {"delta": 1.0, "nll_weight": 0.1, "form": "rank", "tau": 1.0}
LOGPS = "sum"
FORMS = ("rank", "hinge")


def needs_reference(hparams) -> bool:
    return hparams["form"] == "hinge"


def pair_losses(chosen, rejected, ref_chosen, ref_rejected, *, delta, nll_weight, form, tau):
    if form == "hinge":
        gap = (chosen - ref_chosen) - (rejected - ref_rejected)
        return torch.relu(1 - tau * gap)
    return torch.relu(delta - (chosen - rejected)) - nll_weight * chosen
