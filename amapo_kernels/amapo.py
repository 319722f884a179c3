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
    "no_adaptive": Eq. 8 with the oracle mu: m_i = beta * mu where gated (one constant per batch)
    "no_zero":     no zero margin for correctly ranked pairs: the exp margin on every pair
Edge cases: B = 1 or sd = 0 gives m = 0 (a spread within the rounding of sumsq - sum^2/n counts as 0);
the exponent is capped at 50 (m <= beta * 5.2e21), so loss and gradients stay finite in fp32.
"""

import torch
import torch.distributed as dist
from torch import nn

from amapo_kernels._checks import check_choice, check_even_batch, check_logits_labels, check_pair_logps
from amapo_kernels._ops import ops
from amapo_kernels.sequence_logps import sequence_logps

VARIANTS = ("code", "paper")
ABLATIONS = (None, "no_znorm", "no_exp", "no_adaptive", "no_zero")


def _resolve_group(group):
    """The process group whose pairs share the batch statistics (the world if one is initialized)."""
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    if group is None or dist.get_world_size(group) == 1:
        return None
    return group


def batch_sums(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, group=None) -> torch.Tensor:
    """float64 [sum d, sum d^2, count] over the pairs of every rank in `group` (all-reduced)."""
    d = chosen_logps.detach().double() - rejected_logps.detach().double()
    count = torch.full((), d.numel(), dtype=torch.float64, device=d.device)
    sums = torch.stack([d.sum(), (d * d).sum(), count])
    group = _resolve_group(group)
    if group is not None:
        from torch.distributed import _functional_collectives as funcol

        sums = funcol.all_reduce(sums, "sum", group)
    return sums


def _pair_dtype(chosen_logps, rejected_logps) -> torch.dtype:
    dtype = torch.promote_types(chosen_logps.dtype, rejected_logps.dtype)
    return dtype if dtype == torch.float64 else torch.float32


def _check_hparams(beta, label_smoothing, variant, ablation) -> None:
    if not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing!r}")
    check_choice("variant", variant, VARIANTS)
    check_choice("ablation", ablation, ABLATIONS)


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
        initialized); (sum, sum of squares, count) are all-reduced in float64. The loss is the mean over
        this rank's pairs, so data-parallel gradient averaging gives the gradient of the global mean.
    return_stats: also return a dict of detached metrics (TRL / authors' trainer names).
    """
    check_pair_logps(chosen_logps, rejected_logps)
    _check_hparams(beta, label_smoothing, variant, ablation)
    dtype = _pair_dtype(chosen_logps, rejected_logps)
    chosen, rejected = chosen_logps.to(dtype), rejected_logps.to(dtype)
    sums = batch_sums(chosen, rejected, group)
    loss, margins, stats = ops.amapo_loss_fwd(
        chosen, rejected, sums, float(beta), float(label_smoothing), variant, ablation or "none"
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
):
    """AMaPO from the logits of a concatenated batch: rows [0, B/2) chosen, rows [B/2, B) rejected,
    as TRL's concatenated forward builds them. Log-probs are length-normalized over non-ignored labels.
    inplace_backward: see sequence_logps (the logits' gradient overwrites the logits)."""
    check_logits_labels(logits, labels)
    check_even_batch("logits", logits)
    logps = sequence_logps(logits, labels, ignore_index=ignore_index, average=True, shift=shift,
                           inplace_backward=inplace_backward)
    half = logits.shape[0] // 2
    return amapo_loss(
        logps[:half],
        logps[half:],
        beta=beta,
        label_smoothing=label_smoothing,
        variant=variant,
        ablation=ablation,
        group=group,
        return_stats=return_stats,
    )


class AMaPOLoss(nn.Module):
    """nn.Module form of amapo_loss_from_logits: `loss = AMaPOLoss(beta=2.0)(logits, labels)`."""

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
    ) -> None:
        super().__init__()
        _check_hparams(beta, label_smoothing, variant, ablation)
        self.beta, self.ignore_index, self.label_smoothing = beta, ignore_index, label_smoothing
        self.shift, self.variant, self.ablation, self.group = shift, variant, ablation, group

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
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, variant={self.variant!r}, ablation={self.ablation!r}, shift={self.shift}"
