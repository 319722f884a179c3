"""Per-sequence log-probabilities of labels under the logits, through the compiled op."""

import torch

from amapo_kernels._checks import check_logits_labels
from amapo_kernels._ops import ops


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    average: bool = True,
    shift: bool = False,
) -> torch.Tensor:
    """Sum (or mean) over each row of log_softmax(logits)[t, labels[t]], skipping ignore_index.

    logits: [B, T, V] float32/bfloat16/float16/float64, any batch/time strides, vocabulary dim dense.
    labels: [B, T] int64 in [0, V) or ignore_index.
    shift: logits[:, t] scores labels[:, t + 1] (the causal shift), read in place without a copy.
    average: divide each row by its count of scored labels; a row with none gives 0 (never NaN).
    Returns [B] float32 (float64 for float64 logits). Differentiable in logits.
    """
    check_logits_labels(logits, labels)
    seq_logps, _ = ops.sequence_logps_fwd(logits, labels, int(ignore_index), bool(average), bool(shift))
    return seq_logps
