"""AMaPO (Adaptive Margin-attached Preference Optimization) through the compiled margin+loss op.

Per pair i, d_i = chosen_logps_i - rejected_logps_i (length-normalized log-probs). Over the batch of
every rank in `group`: mean mu and unbiased std sd of d. The margin is detached.

variant="code" (the authors' released trainer, default):
    m_i = beta * exp(min(z_i * mu, 50))  if d_i < mu  else 0,      z_i = (mu - d_i) / sd
variant="paper" (Eq. 9-11: statistics of the reward r = beta * d):
    gamma_i = max(z_i * beta * mu, 0);  m_i = beta * exp(min(gamma_i, 50))  if gamma_i > 0  else 0
loss = mean_i[ -(1-eps) * logsigmoid(beta*d_i - m_i) - eps * logsigmoid(-(beta*d_i - m_i)) ]

Ablations (paper Table 5), with s = mu (code) or beta*mu (paper) the oracle estimate and g_i the gate above:
    "no_znorm":    the exponent uses the raw gap instead of the z-score: (mu - d_i) * s  [paper: beta*(mu - d_i) * s]
    "no_exp":      linear scaling instead of exp: m_i = beta * z_i * s  where gated
    "no_adaptive": Eq. 8 with the oracle mu: m_i = beta * mu where d_i < mu (Eq. 8's gate r_i < mu_r, both
                   variants, either sign of mu; one constant per batch), not no_znorm and no_exp composed
                   (beta * (mu - d_i) * s), though Sec. 5.3 words it as removing both
    "no_zero":     no zero margin for correctly ranked pairs: the exp margin on every pair (paper: gamma_i
                   keeps Eq. 9's max(., 0), so m_i >= beta)
Statistics: per-rank (count, mean, M2) merged with Chan's formula around a pivot, so mu - d_i and sd keep
full fp64 relative precision at any spread (see batch_moments).
Edge cases: B = 1 or sd = 0 (every d equal) gives m = 0;
the exponent is capped at 50 (m <= beta * 5.2e21), so loss and gradients stay finite in fp32.
"""

import torch
from torch import nn

from amapo_kernels._checks import (
    POSITIVE,
    SMOOTHING,
    check_bool,
    check_even_batch,
    check_group,
    check_hparams,
    check_logits_labels,
    check_pair_logps,
)
from amapo_kernels._ops import OP_ABLATIONS, OP_VARIANTS, acc_dtype, ops, refuse_unsupported_transforms
from amapo_kernels.batch_statistics import gathered_moments
from amapo_kernels.sequence_logps import sequence_logps

VARIANTS = OP_VARIANTS
ABLATIONS = (None, *OP_ABLATIONS[1:])  # None: the op's "none"


def batch_moments(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, group=None) -> torch.Tensor:
    """float64 [count, pivot, mean offset, M2] of d = chosen - rejected over the pairs of every rank in
    `group` (amapo_kernels.batch_statistics). The batch mean is pivot + offset and the unbiased variance
    M2 / (count - 1)."""
    return gathered_moments(chosen_logps.detach().double() - rejected_logps.detach().double(), group)


RULES = {"beta": POSITIVE, "label_smoothing": SMOOTHING, "variant": VARIANTS, "ablation": ABLATIONS}


def _check_hparams(beta, label_smoothing, variant, ablation) -> None:
    hparams = {"beta": beta, "label_smoothing": label_smoothing, "variant": variant, "ablation": ablation}
    check_hparams("amapo", hparams, RULES)


def amapo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    label_smoothing: float = 0.0,
    variant: str = "code",
    ablation: str | None = None,
    group=None,
    return_stats: bool = False,
):
    """Mean AMaPO loss over the pairs (see the module docstring for the exact definition).

    chosen_logps, rejected_logps: [B] length-normalized log-probs (sequence_logps(..., average=True)).
    group: process group whose pairs share mu and sd (default: the world when torch.distributed is
        initialized); each rank's (count, mean, M2) are all-gathered in float64 and merged with Chan's
        formula. The loss is the mean over this rank's pairs: averaging gradients over ranks gives the
        gradient of the global mean only when every rank has the same number of pairs (else weight each
        rank's loss by its pair count / the global count).
    return_stats: also return a dict of detached metrics (TRL / authors' trainer names).
    """
    check_pair_logps(chosen_logps, rejected_logps)
    _check_hparams(beta, label_smoothing, variant, ablation)
    check_bool("return_stats", return_stats)
    check_group(group)
    refuse_unsupported_transforms("amapo_kernels.amapo_loss", chosen_logps, rejected_logps)
    dtype = acc_dtype(chosen_logps, rejected_logps)
    chosen, rejected = chosen_logps.to(dtype), rejected_logps.to(dtype)
    moments = batch_moments(chosen, rejected, group)
    loss, margins, stats = ops.amapo_loss_fwd(
        chosen, rejected, moments, float(beta), float(label_smoothing), variant, ablation or "none"
    )
    if not return_stats:
        return loss
    return loss, _metrics(chosen.detach(), rejected.detach(), margins, stats, beta, variant)


def _metrics(chosen, rejected, margins, stats, beta, variant) -> dict:
    unit = beta if variant == "paper" else 1.0  # statistics are of the variant's reward
    return {
        "rewards/chosen": (beta * chosen).mean(),
        "rewards/rejected": (beta * rejected).mean(),
        "rewards/margins": (beta * (chosen - rejected)).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "batch_margin_mean": stats[0] * unit,
        "batch_margin_std": stats[1] * unit,
        "adaptive_margin": margins,
    }


def amapo_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 2.0,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    shift: bool = False,
    variant: str = "code",
    ablation: str | None = None,
    group=None,
    return_stats: bool = False,
    inplace_backward: bool = False,
    check_labels: bool = True,
):
    """AMaPO from the logits of a concatenated batch: rows [0, B/2) chosen, rows [B/2, B) rejected,
    as TRL's concatenated forward builds them. Log-probs are length-normalized over non-ignored labels.
    inplace_backward, check_labels: see sequence_logps (the logits' gradient overwrites the logits; the
    label-range check and its host sync on CUDA)."""
    check_logits_labels(logits, labels)
    check_even_batch("logits", logits)
    _check_hparams(beta, label_smoothing, variant, ablation)  # before the pass over the logits, as every check
    check_bool("return_stats", return_stats)
    check_group(group)
    logps = sequence_logps(logits, labels, ignore_index=ignore_index, average=True, shift=shift,
                           inplace_backward=inplace_backward, check_labels=check_labels)
    chosen, rejected = logps.chunk(2)  # its backward is one cat (two slices' would be 5 kernels)
    return amapo_loss(
        chosen,
        rejected,
        beta=beta,
        label_smoothing=label_smoothing,
        variant=variant,
        ablation=ablation,
        group=group,
        return_stats=return_stats,
    )


class AMaPOLoss(nn.Module):
    """nn.Module form of amapo_loss_from_logits: `loss = AMaPOLoss(beta=2.0)(logits, labels)`; every keyword,
    inplace_backward and check_labels included, is that function's."""

    def __init__(
        self,
        *,
        beta: float = 2.0,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        shift: bool = False,
        variant: str = "code",
        ablation: str | None = None,
        group=None,
        inplace_backward: bool = False,
        check_labels: bool = True,
    ) -> None:
        super().__init__()
        _check_hparams(beta, label_smoothing, variant, ablation)
        for name, switch in (("shift", shift), ("inplace_backward", inplace_backward), ("check_labels", check_labels)):
            check_bool(name, switch)
        self.beta, self.ignore_index, self.label_smoothing = beta, ignore_index, label_smoothing
        self.shift, self.variant, self.ablation, self.group = shift, variant, ablation, group
        self.inplace_backward, self.check_labels = inplace_backward, check_labels

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, return_stats: bool = False):
        return amapo_loss_from_logits(
            logits,
            labels,
            beta=self.beta,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            shift=self.shift,
            variant=self.variant,
            ablation=self.ablation,
            group=self.group,
            return_stats=return_stats,
            inplace_backward=self.inplace_backward,
            check_labels=self.check_labels,
        )

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, variant={self.variant!r}, ablation={self.ablation!r}, shift={self.shift}, "
                f"inplace_backward={self.inplace_backward}")
