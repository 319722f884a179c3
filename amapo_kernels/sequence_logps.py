"""Per-sequence log-probabilities of labels under the logits, through the compiled op."""

import torch

from amapo_kernels._checks import check_bool, check_ignore_index, check_logits_labels, check_shift
from amapo_kernels._ops import ops, refuse_unsupported_transforms


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    average: bool = True,
    shift: bool = False,
    inplace_backward: bool = False,
    check_labels: bool = True,
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
        overwritten values. Eager mode only: under torch.compile the ordinary backward is used. Refused
        (errors, never a wrong gradient): logits whose elements share memory (expand, overlapping
        as_strided), a leaf that requires grad or a view of one (a model's logits are neither), and a
        backward with create_graph=True.
    check_labels: on CUDA, check before any kernel runs that every scored label lies in [0, V) (a clear
        ValueError). The check costs one host sync per call; False skips it for users who validated their
        data once (and it is skipped anyway while a CUDA graph is captured): an out-of-range label then gives
        a NaN log-prob for its sequence, never an out-of-bounds read. On the CPU the check always runs.
    Forward-mode AD, torch.func.grad/jvp/vjp and double backward raise errors naming this op; vmap works
    (not with inplace_backward=True: an error naming it).
    """
    check_logits_labels(logits, labels)
    options = (check_ignore_index(ignore_index), check_bool("average", average), check_shift(shift, logits.shape[1]))
    check_labels = check_bool("check_labels", check_labels)
    inplace_backward = check_bool("inplace_backward", inplace_backward)
    refuse_unsupported_transforms("amapo_kernels.sequence_logps", logits, labels, vmap_refused=(
        "amapo_kernels.sequence_logps(inplace_backward=True)" if inplace_backward else None))
    if inplace_backward and not torch.compiler.is_compiling():
        _check_no_internal_overlap(logits)
        _check_not_a_leaf(logits)
        return _InplaceBackward.apply(logits, labels, *options, check_labels)
    seq_logps, _ = ops.sequence_logps_fwd(logits, labels, *options, check_labels)
    return seq_logps


def _elements_are_distinct(tensor: torch.Tensor) -> bool:
    """Whether no two elements share memory, proven from sizes and strides: taken by increasing stride, each
    dimension steps over the whole span of the ones before it. Every slice, step or permutation of a dense
    tensor passes (torch's own check answers "too hard to tell" for any non-contiguous one); an expand
    (stride 0) or an overlapping as_strided fails, as may an exotic interleaving, which is refused."""
    span = 0  # the largest offset the dimensions taken so far reach
    for stride, size in sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size > 1):
        if stride <= span:
            return False
        span += stride * (size - 1)
    return True


def _check_no_internal_overlap(logits: torch.Tensor) -> None:
    """Writing a gradient over logits whose elements alias one another would sum them into one slot."""
    if not _elements_are_distinct(logits):
        raise ValueError(
            f"inplace_backward=True needs logits whose elements do not share memory, got strides {logits.stride()} "
            f"for shape {tuple(logits.shape)} (an expand or an overlapping as_strided view); call .contiguous() "
            "first or pass inplace_backward=False"
        )


def _check_not_a_leaf(logits: torch.Tensor) -> None:
    """The backward writes the gradient over the logits: on a leaf that requires grad (or a view of one) that
    would overwrite the leaf's values with its own gradient and leave leaf.grad aliasing leaf (torch refuses
    such an in-place op; the op's own check cannot, as it runs with grad mode off)."""
    root = logits._base if logits._is_view() else logits
    if logits.requires_grad and root is not None and root.is_leaf and root.requires_grad:
        raise ValueError(
            "inplace_backward=True writes the gradient over the logits, which here are "
            f"{'a view of ' if root is not logits else ''}a leaf that requires grad (their values would be lost "
            "and .grad would alias them); pass inplace_backward=False, or logits computed from the leaf"
        )


class _InplaceBackward(torch.autograd.Function):
    """sequence_logps whose backward overwrites the logits with their gradient."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, average, shift, check_labels):
        seq_logps, softmax_stats = ops.sequence_logps_fwd(logits, labels, ignore_index, average, shift, check_labels)
        ctx.save_for_backward(logits, labels, softmax_stats)
        ctx.options = (ignore_index, average, shift)
        ctx.mark_non_differentiable(softmax_stats)
        return seq_logps

    @staticmethod
    def backward(ctx, grad_seq):
        if torch.is_grad_enabled():  # create_graph=True: the gradient would carry the logits' own graph
            raise RuntimeError(
                "amapo_kernels.sequence_logps(inplace_backward=True) does not support create_graph=True (double "
                "backward): the gradient is written over the logits; use inplace_backward=False"
            )
        logits, labels, softmax_stats = ctx.saved_tensors  # raises if the logits changed since forward
        version = logits._version
        ops.sequence_logps_bwd_inplace(grad_seq.contiguous(), logits, labels, softmax_stats, *ctx.options)
        if logits._version == version:  # make every other saved copy of the logits fail loudly
            torch.autograd.graph.increment_version(logits)
        return logits.detach(), None, None, None, None, None
