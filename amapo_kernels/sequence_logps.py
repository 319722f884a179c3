"""Per-sequence log-probabilities of labels under the logits, through the compiled op."""

import torch
from torch.autograd.function import once_differentiable

from amapo_kernels._checks import check_logits_labels
from amapo_kernels._ops import ops


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    average: bool = True,
    shift: bool = False,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Sum (or mean) over each row of log_softmax(logits)[t, labels[t]], skipping ignore_index.

    logits: [B, T, V] float32/bfloat16/float16/float64, any batch/time strides, vocabulary dim dense.
    labels: [B, T] int64 in [0, V) or ignore_index.
    shift: logits[:, t] scores labels[:, t + 1] (the causal shift), read in place without a copy.
    average: divide each row by its count of scored labels; a row with none gives 0 (never NaN).
    Returns [B] float32 (float64 for float64 logits). Differentiable in logits.
    inplace_backward: write the logits' gradient over the logits themselves (no second logits-sized
        buffer, as Liger-Kernel does). Safe: if anything else saved the logits for its own backward and
        runs after this one, autograd raises "modified by an inplace operation" instead of computing with
        overwritten values. Eager mode only: under torch.compile the ordinary backward is used.
    """
    check_logits_labels(logits, labels)
    options = (int(ignore_index), bool(average), bool(shift))
    if inplace_backward and not torch.compiler.is_compiling():
        return _InplaceBackward.apply(logits, labels, *options)
    seq_logps, _ = ops.sequence_logps_fwd(logits, labels, *options)
    return seq_logps


class _InplaceBackward(torch.autograd.Function):
    """sequence_logps whose backward overwrites the logits with their gradient."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, average, shift):
        seq_logps, softmax_stats = ops.sequence_logps_fwd(logits, labels, ignore_index, average, shift)
        ctx.save_for_backward(logits, labels, softmax_stats)
        ctx.options = (ignore_index, average, shift)
        ctx.mark_non_differentiable(softmax_stats)
        return seq_logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_seq):
        logits, labels, softmax_stats = ctx.saved_tensors  # raises if the logits changed since forward
        version = logits._version
        ops.sequence_logps_bwd_inplace(grad_seq.contiguous(), logits, labels, softmax_stats, *ctx.options)
        if logits._version == version:  # make every other saved copy of the logits fail loudly
            torch.autograd.graph.increment_version(logits)
        return logits, None, None, None, None
