"""Loads the compiled ops and gives them what torch.compile and autograd need: fake kernels and
backward formulas. The kernels themselves (CPU and CUDA) are registered by the C++ library."""

import torch
import torch.autograd.forward_ad as fwAD

from amapo_kernels import _extension
from amapo_kernels._checks import LOGITS_DTYPES

_C = _extension.load()  # registers torch.ops.amapo_kernels.*; a failure names its cause and fix

ops = torch.ops.amapo_kernels


def has_cuda_kernels() -> bool:
    """Whether this build compiled the CUDA kernels (False on a CPU-only install)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("amapo_kernels::sequence_logps_fwd", "CUDA")


def cpu_kernels() -> str:
    """The CPU kernels of sequence_logps for fp32/bf16/fp16 logits: "avx512" or "avx2" (the row kernels) or
    "aten" (ATen's ops). Chosen once per process: AMAPO_CPU_KERNELS=auto (default: the widest set the
    processor has), avx512, avx2 or aten; a set the processor lacks is a RuntimeError, here and in the op."""
    return _C.cpu_kernels()


def acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype the ops accumulate in and the losses compute in: float64 where any tensor given is float64
    (whichever argument holds it), float32 otherwise; None entries are skipped."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _on_one_device(op_name: str, *tensors: torch.Tensor) -> None:
    """The fake kernels run for meta tensors, also when the other arguments are real ones: a real op refuses
    such a mix ("not on the expected device"), so these do too, instead of returning empty tensors there."""
    devices = {tensor.device for tensor in tensors}
    if len(devices) > 1:
        raise RuntimeError(f"amapo_kernels::{op_name}: expected all tensors on one device, got "
                           f"{sorted(str(device) for device in devices)}")


# the amapo_loss_fwd op's variant and ablation strings (csrc/amapo_loss.h parse_variant, parse_ablation)
OP_VARIANTS = ("code", "paper")
OP_ABLATIONS = ("none", "no_znorm", "no_exp", "no_adaptive", "no_zero")


def _check_logits_labels(logits, labels, shift) -> None:
    """The C++ ops' own checks (csrc/common.h check_logits_labels), for the fake kernels: a direct call on meta or
    fake tensors is refused as the real op refuses it, instead of returning tensors of made-up shapes."""
    torch._check_value(logits.dim() == 3, lambda: f"logits must be [B, T, V], got {logits.dim()} dims")
    torch._check_value(labels.dim() == 2, lambda: f"labels must be [B, T], got {labels.dim()} dims")
    torch._check_value(logits.shape[0] == labels.shape[0] and logits.shape[1] == labels.shape[1],
                       lambda: "logits [B, T, V] and labels [B, T] disagree on B or T")
    torch._check_value(logits.shape[2] > 0, lambda: "logits has an empty vocabulary (V = 0)")
    torch._check_value(logits.shape[2] == 1 or logits.stride(2) == 1,
                       lambda: "logits must have a contiguous vocabulary dimension")
    torch._check_value(not shift or logits.shape[1] >= 1, lambda: "shift=True needs T >= 1")
    torch._check_type(labels.dtype == torch.int64, lambda: "labels must be int64")
    torch._check_type(logits.dtype in LOGITS_DTYPES, lambda: "logits must be float32, float64, float16 or bfloat16")


def _check_pair_dtypes(chosen, rejected) -> None:
    torch._check_type(chosen.dtype in (torch.float32, torch.float64), lambda: "chosen_logps must be float32 or float64")
    torch._check_type(rejected.dtype == chosen.dtype, lambda: "rejected_logps must have chosen_logps' dtype")


@torch.library.register_fake("amapo_kernels::sequence_logps_fwd")
def _sequence_logps_fwd_fake(logits, labels, ignore_index, average, shift, check_labels=True):
    _on_one_device("sequence_logps_fwd", logits, labels)
    _check_logits_labels(logits, labels, shift)
    batch, steps = labels.shape
    dtype = acc_dtype(logits)
    seq = logits.new_empty((batch,), dtype=dtype)
    softmax_stats = logits.new_empty((batch, steps - 1 if shift else steps, 2), dtype=dtype)
    return seq, softmax_stats


@torch.library.register_fake("amapo_kernels::sequence_logps_bwd")
def _sequence_logps_bwd_fake(grad, logits, labels, softmax_stats, ignore_index, average, shift):
    _on_one_device("sequence_logps_bwd", grad, logits, labels, softmax_stats)
    _check_sequence_logps_bwd(grad, logits, labels, softmax_stats, shift)
    return logits.new_empty(logits.shape)


@torch.library.register_fake("amapo_kernels::sequence_logps_bwd_inplace")
def _sequence_logps_bwd_inplace_fake(grad, logits, labels, softmax_stats, ignore_index, average, shift):
    _on_one_device("sequence_logps_bwd_inplace", grad, logits, labels, softmax_stats)
    _check_sequence_logps_bwd(grad, logits, labels, softmax_stats, shift)
    return None


def _check_sequence_logps_bwd(grad, logits, labels, softmax_stats, shift) -> None:
    """csrc/sequence_logps.h check_backward_inputs, for the fake kernels."""
    _check_logits_labels(logits, labels, shift)
    steps = logits.shape[1] - 1 if shift else logits.shape[1]
    torch._check_value(grad.dim() == 1 and grad.shape[0] == logits.shape[0], lambda: "grad must be [B]")
    torch._check_value(softmax_stats.dim() == 3 and softmax_stats.shape[0] == logits.shape[0]
                       and softmax_stats.shape[1] == steps and softmax_stats.shape[2] == 2,
                       lambda: "softmax_stats must be [B, T - shift, 2]")
    torch._check_type(softmax_stats.dtype == acc_dtype(logits), lambda: f"softmax_stats must be {acc_dtype(logits)}")


@torch.library.register_fake("amapo_kernels::amapo_loss_fwd")
def _amapo_loss_fwd_fake(chosen_logps, rejected_logps, batch_moments, beta, label_smoothing, variant, ablation):
    _on_one_device("amapo_loss_fwd", chosen_logps, rejected_logps, batch_moments)
    # csrc/amapo_loss.h check_pairs, parse_variant, parse_ablation
    torch._check_value(chosen_logps.dim() == 1, lambda: "chosen_logps must be 1-D [B]")
    torch._check_value(rejected_logps.shape == chosen_logps.shape,
                       lambda: "rejected_logps must have the shape of chosen_logps")
    _check_pair_dtypes(chosen_logps, rejected_logps)
    torch._check_value(batch_moments.dim() == 1 and batch_moments.shape[0] == 4
                       and batch_moments.dtype == torch.float64,
                       lambda: "batch_moments must be float64 [count, pivot, mean offset, M2]")
    torch._check_value(variant in OP_VARIANTS, lambda: f"variant must be 'code' or 'paper', got '{variant}'")
    torch._check_value(ablation in OP_ABLATIONS, lambda: "ablation must be one of none, no_znorm, no_exp, "
                       f"no_adaptive, no_zero; got '{ablation}'")
    loss = chosen_logps.new_empty(())
    margins = chosen_logps.new_empty(chosen_logps.shape)
    return loss, margins, batch_moments.new_empty((2,))


@torch.library.register_fake("amapo_kernels::amapo_loss_bwd")
def _amapo_loss_bwd_fake(grad, chosen_logps, rejected_logps, margins, beta, label_smoothing):
    _on_one_device("amapo_loss_bwd", grad, chosen_logps, rejected_logps, margins)
    # csrc/amapo_loss.h check_pair_backward_inputs
    torch._check_value(chosen_logps.dim() == 1 and margins.shape == chosen_logps.shape
                       and rejected_logps.shape == chosen_logps.shape,
                       lambda: "margins, chosen_logps and rejected_logps must all be [B]")
    torch._check_value(grad.numel() == 1, lambda: "grad must be a scalar")
    _check_pair_dtypes(chosen_logps, rejected_logps)
    torch._check_type(margins.is_floating_point() and grad.is_floating_point(),
                      lambda: "margins and grad must be floating point")
    return chosen_logps.new_empty(chosen_logps.shape), rejected_logps.new_empty(rejected_logps.shape)


def _sequence_logps_setup(ctx, inputs, output):
    logits, labels, ignore_index, average, shift = inputs[:5]  # and check_labels, which the backward needs not
    ctx.save_for_backward(logits, labels, output[1])
    ctx.options = (ignore_index, average, shift)
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zeros kernel for the unused gradient of softmax_stats


def _sequence_logps_backward(ctx, grad_seq, grad_softmax_stats):
    if grad_seq is None:  # unmaterialized: nothing downstream used seq_logps
        return (None,) * ctx.num_inputs
    logits, labels, softmax_stats = ctx.saved_tensors
    grad_logits = ops.sequence_logps_bwd(grad_seq, logits, labels, softmax_stats, *ctx.options)
    return (grad_logits,) + (None,) * (ctx.num_inputs - 1)


torch.library.register_autograd(
    "amapo_kernels::sequence_logps_fwd", _sequence_logps_backward, setup_context=_sequence_logps_setup
)


def _amapo_loss_setup(ctx, inputs, output):
    chosen, rejected, _, beta, label_smoothing, _, _ = inputs
    ctx.save_for_backward(chosen, rejected, output[1])
    ctx.hparams = (beta, label_smoothing)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zeros kernels for the unused gradients of margins and stats


def _amapo_loss_backward(ctx, grad_loss, grad_margins, grad_stats):
    if grad_loss is None:  # unmaterialized: nothing downstream used the loss
        return (None,) * 7
    chosen, rejected, margins = ctx.saved_tensors
    grad_chosen, grad_rejected = ops.amapo_loss_bwd(grad_loss, chosen, rejected, margins, *ctx.hparams)
    return grad_chosen, grad_rejected, None, None, None, None, None


torch.library.register_autograd("amapo_kernels::amapo_loss_fwd", _amapo_loss_backward, setup_context=_amapo_loss_setup)


# ---------------------------------------------------------------------------------------------
# What the ops do not support says so, instead of a silent zero tangent or a None second derivative
# ---------------------------------------------------------------------------------------------


def _no_double_backward(op_name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{op_name}: double backward (differentiating a gradient taken with create_graph=True) is not "
            "supported; its backward is a fused kernel with no derivative of its own"
        )

    return backward


for _name, _public in (("sequence_logps_bwd", "sequence_logps"), ("amapo_loss_bwd", "amapo_loss")):
    # the backward kernels get an autograd formula of their own: it keeps them off the autograd graph
    # while they run and turns a second derivative through them into this error
    torch.library.register_autograd(f"amapo_kernels::{_name}", _no_double_backward(f"amapo_kernels.{_public}"))


def refuse_unsupported_transforms(op_name: str, *tensors: torch.Tensor, vmap_refused: str | None = None) -> None:
    """Forward-mode AD and torch.func's differentiating transforms (grad, vjp, jvp, jacrev, jacfwd,
    hessian) are not implemented for the fused ops: raise NotImplementedError naming the op, before any
    kernel runs. Ordinary autograd (backward, torch.autograd.grad) is supported, and torch.func.vmap unless
    vmap_refused names the call that does not support it (then refused the same way)."""
    if torch.compiler.is_compiling():
        return
    functorch = torch._C._functorch
    vmap_note = " (torch.func.vmap is supported)" if vmap_refused is None else ""
    for tensor in tensors:
        if tensor is None:
            continue
        if fwAD.unpack_dual(tensor).tangent is not None:
            raise NotImplementedError(
                f"{op_name}: forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd) is not "
                "implemented; use reverse mode (loss.backward() / torch.autograd.grad)"
            )
        while functorch.is_functorch_wrapped_tensor(tensor):
            if functorch.is_gradtrackingtensor(tensor):
                raise NotImplementedError(
                    f"{op_name}: torch.func differentiating transforms (grad, vjp, jvp, jacrev, jacfwd, hessian) "
                    f"are not implemented; use loss.backward() / torch.autograd.grad{vmap_note}"
                )
            if vmap_refused is not None and functorch.is_batchedtensor(tensor):
                raise NotImplementedError(f"{vmap_refused}: torch.func.vmap is not implemented; call it once per "
                                          "slice (or, for independent sequences, fold the vmapped dimension into B)")
            tensor = functorch.get_unwrapped(tensor)
