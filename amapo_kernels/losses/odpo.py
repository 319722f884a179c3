"""ODPO (Amini et al. 2024): DPO with the offset alpha * log(score_w - score_l) inside the sigmoid,
from external scores of the two responses (chosen_scores > rejected_scores)."""

import torch
import torch.nn.functional as F

from amapo_kernels._checks import NON_NEGATIVE, POSITIVE, check_data

DEFAULTS = {"beta": 0.1, "alpha": 1.0, "chosen_scores": None, "rejected_scores": None}
RULES = {"beta": POSITIVE, "alpha": NON_NEGATIVE}
REQUIRED = ("chosen_scores", "rejected_scores")
LOGPS = "sum"


def needs_reference(hparams) -> bool:
    return True


def _exact_gap(chosen_scores, rejected_scores):
    if not chosen_scores.is_floating_point() and not rejected_scores.is_floating_point():
        return (chosen_scores.long() - rejected_scores.long()).double()
    return chosen_scores.double() - rejected_scores.double()


def pair_losses(chosen, rejected, ref_chosen, ref_rejected, *, beta, alpha, chosen_scores, rejected_scores):
    # the gap in float64, not in the loss dtype: two distinct scores (float64, or int64 above 2**24) must not round
    # to one float32 value (a tie refused) or to a gap of another size (a wrong offset); integer scores subtract
    # exactly first (above 2**53 float64 would round them too); only the offset is cast
    score_gap = _exact_gap(chosen_scores, rejected_scores)
    check_data(torch.all(score_gap > 0), "chosen_scores must exceed rejected_scores on every pair (ODPO's offset is log of the gap)")
    offset = (alpha * torch.log(score_gap)).to(chosen.dtype)
    logits = beta * ((chosen - ref_chosen) - (rejected - ref_rejected)) - offset
    return -F.logsigmoid(logits)
