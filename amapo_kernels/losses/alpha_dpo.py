"""alpha-DPO (Wu et al. 2024): SimPO's reward gap u against the detached margin gamma + beta*alpha*M*,
M = u - (ref gap) the DPO log-ratio gap and M* its z-score. All four log-probs are length-normalized, as in the
official code, which places beta as here: -logsigmoid(beta * (u - sg[gamma/beta + alpha * M*])). M's statistics
are over the pairs of every rank of `group` (the world when torch.distributed is initialized), as the official
trainer gathers M from every process. decay = 0 (the default) z-scores with the current batch's mean and
unbiased std (0 when the batch has no spread, NaN when M is not finite); decay > 0 with the running (decayed)
mean and std of the batches so far, as the official trainer does (its decay is 0.9), kept in the
batch_statistics.RunningStatistics passed as `running=` from call to call. label_smoothing is cDPO's, as the
official trainer (a TRL DPOTrainer) applies its label_smoothing to this loss."""

from amapo_kernels import batch_statistics
from amapo_kernels._checks import DECAY, NON_NEGATIVE, POSITIVE, SMOOTHING
from amapo_kernels.losses._common import smoothed_sigmoid_loss

DEFAULTS = {"beta": 2.5, "gamma": 1.5, "alpha": 0.2, "decay": 0.0, "label_smoothing": 0.0}
RULES = {"beta": POSITIVE, "gamma": NON_NEGATIVE, "alpha": NON_NEGATIVE, "decay": DECAY, "label_smoothing": SMOOTHING}
BATCH_STATISTICS = True  # takes group=: M* is over the pairs of every rank
RUNNING_STATISTICS = True  # takes running=: the state of M's running statistics (decay > 0)
LOGPS = "mean"


def needs_reference(hparams) -> bool:
    return True


def rewards(logps, ref_logps, *, beta, alpha, **_):
    """beta log(pi / pi_hat) of each response, pi_hat = U (pi / pi_ref)^alpha the method's implicit reference (U
    uniform: a constant, dropped): beta ((1 - alpha) logp + alpha ref_logp), the rewards the official trainer
    logs."""
    return beta * (logps - alpha * (logps - ref_logps))


def pair_losses(chosen, rejected, ref_chosen, ref_rejected, *, beta, gamma, alpha, decay, label_smoothing,
                group=None, running=None):
    gap = chosen - rejected
    log_ratio_gap = gap - (ref_chosen - ref_rejected)
    if decay > 0:
        z_score = running.z_scores(log_ratio_gap, decay, group)
    else:
        z_score = batch_statistics.z_scores(log_ratio_gap, group)
    logits = beta * gap - (gamma + beta * alpha * z_score.to(gap.dtype))  # z_score detached
    return smoothed_sigmoid_loss(logits, label_smoothing)
