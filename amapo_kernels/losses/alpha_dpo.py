"""alpha-DPO (Wu et al. 2024): SimPO's reward gap u against the detached margin gamma + beta*alpha*M*,
M = u - (ref gap) the DPO log-ratio gap and M* its z-score over the batch (unbiased std; 0 when the
batch has no spread, NaN when M is not finite). All four log-probs are length-normalized, as in the official
code, which places beta as here: -logsigmoid(beta * (u - sg[gamma/beta + alpha * M*])). The batch is the
pairs of every rank of `group` (the world when torch.distributed is initialized), as the official trainer
gathers M from every process; it z-scores with running (decayed) statistics of those gathered batches,
this stateless form with the current one."""

import torch.nn.functional as F

from amapo_kernels import batch_statistics
from amapo_kernels._checks import NON_NEGATIVE, POSITIVE

DEFAULTS = {"beta": 2.5, "gamma": 1.5, "alpha": 0.2}
RULES = {"beta": POSITIVE, "gamma": NON_NEGATIVE, "alpha": NON_NEGATIVE}
BATCH_STATISTICS = True  # takes group=: M* is over the pairs of every rank
LOGPS = "mean"


def needs_reference(hparams) -> bool:
    return True


def pair_losses(chosen, rejected, ref_chosen, ref_rejected, *, beta, gamma, alpha, group=None):
    gap = chosen - rejected
    z_score = batch_statistics.z_scores(gap - (ref_chosen - ref_rejected), group).to(gap.dtype)  # detached
    return -F.logsigmoid(beta * gap - (gamma + beta * alpha * z_score))
