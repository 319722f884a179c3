"""amapo_kernels: exact, fused preference-optimization losses as PyTorch ops (CPU and CUDA).

    import amapo_kernels
    logps = amapo_kernels.sequence_logps(logits, labels, shift=True)        # [B], length-normalized
    loss = amapo_kernels.amapo_loss_from_logits(logits, labels, beta=2.0, shift=True)
    loss = amapo_kernels.preference_loss(lc, lr, method="dpo", ref_chosen_logps=rc, ref_rejected_logps=rr)
    loss = amapo_kernels.amapo_loss_from_hidden(hidden, lm_head.weight, labels, shift=True)  # no logits
"""

from amapo_kernels import reference
from amapo_kernels._ops import cpu_kernels, has_cuda_kernels
from amapo_kernels.amapo import ABLATIONS, VARIANTS, AMaPOLoss, amapo_loss, amapo_loss_from_logits
from amapo_kernels.batch_statistics import RunningStatistics
from amapo_kernels.fused_linear import amapo_loss_from_hidden, preference_loss_from_hidden, sequence_logps_from_hidden
from amapo_kernels.preference import METHODS, preference_loss
from amapo_kernels.sequence_logps import sequence_logps

__version__ = "0.1.0"

__all__ = [
    "ABLATIONS",
    "AMaPOLoss",
    "METHODS",
    "RunningStatistics",
    "VARIANTS",
    "amapo_loss",
    "amapo_loss_from_hidden",
    "amapo_loss_from_logits",
    "cpu_kernels",
    "has_cuda_kernels",
    "preference_loss",
    "preference_loss_from_hidden",
    "reference",
    "sequence_logps",
    "sequence_logps_from_hidden",
]
