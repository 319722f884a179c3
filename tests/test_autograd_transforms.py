"""Autograd never lies: what the fused ops do not support (forward-mode AD, torch.func's differentiating
transforms, double backward, an in-place backward over aliased logits or with create_graph=True) raises an
error naming the op or the argument instead of returning a zero tangent or a wrong gradient; what they do
support (vmap) gives the right value."""

import re

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from helpers import peaked_logits, random_labels

import amapo_kernels as ak

FUNCTORCH = re.escape("torch.func differentiating transforms")


def logits_labels(dtype=torch.float64, batch=4):
    generator = torch.Generator().manual_seed(0)
    logits = peaked_logits(batch, 5, 11, dtype=dtype, generator=generator)
    return logits, random_labels(batch, 5, 11, ignore_prob=0.2, generator=generator)


def pairs():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(6, generator=generator, dtype=torch.float64) - 1,
            torch.randn(6, generator=generator, dtype=torch.float64) - 1.3)


def hidden_inputs():
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(4, 5, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(11, 8, generator=generator, dtype=torch.float64)
    return hidden, weight, random_labels(4, 5, 11, ignore_prob=0.2, generator=generator)


logits, labels = logits_labels()
chosen, rejected = pairs()
hidden, weight, hidden_labels = hidden_inputs()
# (op name in the error, function of one tensor, its input)
CASES = {
    "sequence_logps": (lambda x: ak.sequence_logps(x, labels), logits),
    "sequence_logps(inplace)": (lambda x: ak.sequence_logps(x * 1, labels, inplace_backward=True), logits),
    "amapo_loss": (lambda c: ak.amapo_loss(c, rejected), chosen),
    "amapo_loss_from_logits": (lambda x: ak.amapo_loss_from_logits(x, labels), logits),
    "sequence_logps_from_hidden": (lambda h: ak.sequence_logps_from_hidden(h, weight, hidden_labels), hidden),
}
OP_NAMES = {"sequence_logps": "sequence_logps", "sequence_logps(inplace)": "sequence_logps",
            "amapo_loss": "amapo_loss", "amapo_loss_from_logits": "sequence_logps",
            "sequence_logps_from_hidden": "sequence_logps_from_hidden"}


@pytest.mark.parametrize("case", CASES)
def test_forward_mode_ad_raises(case):
    fn, x = CASES[case]
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match=rf"amapo_kernels\.{OP_NAMES[case]}: forward-mode AD"):
            fn(dual)


@pytest.mark.parametrize("transform", ["jvp", "grad", "vjp", "jacrev", "jacfwd"])
@pytest.mark.parametrize("case", CASES)
def test_func_transforms_raise(case, transform):
    fn, x = CASES[case]
    scalar = lambda v: fn(v).sum()  # noqa: E731
    calls = {
        "jvp": lambda: torch.func.jvp(fn, (x,), (torch.ones_like(x),)),
        "grad": lambda: torch.func.grad(scalar)(x),
        "vjp": lambda: torch.func.vjp(fn, x),
        "jacrev": lambda: torch.func.jacrev(fn)(x),
        "jacfwd": lambda: torch.func.jacfwd(fn)(x),
    }
    what = "forward-mode AD" if transform in ("jvp", "jacfwd") else FUNCTORCH
    with pytest.raises(NotImplementedError, match=rf"amapo_kernels\.{OP_NAMES[case]}: {what}"):
        calls[transform]()


def test_vmap_is_supported():
    """vmap over a leading dim gives the per-slice results (sequence_logps) and per-batch statistics (AMaPO)."""
    stacked = torch.stack([logits, logits.flip(0)])
    out = torch.func.vmap(lambda x: ak.sequence_logps(x, labels))(stacked)
    torch.testing.assert_close(out, torch.stack([ak.sequence_logps(x, labels) for x in stacked]))
    both = torch.stack([chosen, chosen.flip(0) * 2])
    out = torch.func.vmap(lambda c: ak.amapo_loss(c, rejected))(both)
    torch.testing.assert_close(out, torch.stack([ak.amapo_loss(c, rejected) for c in both]))


def test_functorch_transforms_of_running_statistics_are_refused_while_they_update():
    """alpha_dpo's running statistics under vmap, grad or both: an update would keep a BatchedTensor (one state
    for several batches) or a wrapper that dies with the transform as the state, so it is an error naming
    RunningStatistics, the state untouched; frozen() reads the state per slice."""
    running = ak.RunningStatistics()
    refs = {"ref_chosen_logps": chosen * 0.9, "ref_rejected_logps": rejected * 1.1}

    def loss(c):
        return ak.preference_loss(c, rejected, method="alpha_dpo", **refs, decay=0.9, running=running)

    both = torch.stack([chosen, chosen.flip(0) * 2])
    for transform, x in ((torch.func.vmap(loss), both), (torch.func.vmap(torch.func.grad(loss)), both),
                         (torch.func.grad(loss), chosen)):
        with pytest.raises(NotImplementedError, match=r"RunningStatistics under a torch\.func transform"):
            transform(x)
        assert type(running.mean_std) is torch.Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(
            running.mean_std) and torch.equal(running.mean_std, torch.zeros(2, dtype=torch.float64))
    loss(chosen)
    with running.frozen():
        out = torch.func.vmap(loss)(both)
        torch.testing.assert_close(out, torch.stack([loss(c) for c in both]))
    assert running.mean_std[1] > 0 and not torch._C._functorch.is_batchedtensor(running.mean_std)


VMAP_REFUSED = {  # calls without a vmap rule, and the name their error gives
    "sequence_logps_from_hidden": (lambda h: ak.sequence_logps_from_hidden(h, weight, hidden_labels), hidden,
                                   "sequence_logps_from_hidden"),
    "amapo_loss_from_hidden": (lambda h: ak.amapo_loss_from_hidden(h, weight, hidden_labels), hidden,
                               "sequence_logps_from_hidden"),
    "sequence_logps(inplace)": (lambda x: ak.sequence_logps(x * 1, labels, inplace_backward=True), logits,
                                re.escape("sequence_logps(inplace_backward=True)")),
}


@pytest.mark.parametrize("case", VMAP_REFUSED)
def test_vmap_is_refused_where_it_has_no_rule(case):
    """An error naming the call (before: functorch's generic setup_context error, or a missing batching rule
    for torch's overlap check)."""
    fn, x, name = VMAP_REFUSED[case]
    with pytest.raises(NotImplementedError, match=rf"amapo_kernels\.{name}: torch\.func\.vmap is not implemented"):
        torch.func.vmap(fn)(torch.stack([x, x]))


@pytest.mark.parametrize("case", [
    "sequence_logps", "amapo_loss", "amapo_loss_from_logits", "sequence_logps_from_hidden"])
def test_double_backward_raises(case):
    """Also where the gradient is linear in the output (a sum): the from-hidden gradient was then silently
    constant, so a gradient penalty on it added nothing."""
    fn, x = CASES[case]
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(fn(leaf).sum(), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match=rf"amapo_kernels\.{OP_NAMES[case]}: double backward"):
        torch.autograd.grad(grad.pow(2).sum(), leaf)


@pytest.mark.parametrize("case", ["sequence_logps", "sequence_logps_from_hidden"])
def test_first_order_with_create_graph_is_still_right(case):
    fn, x = CASES[case]
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(fn(leaf).sum(), leaf, create_graph=True)
    (expected,) = torch.autograd.grad(fn(leaf).sum(), leaf)
    assert torch.equal(grad.detach(), expected)


def test_inplace_backward_refuses_create_graph():
    leaf = logits.clone().requires_grad_()
    out = ak.sequence_logps(leaf * 1, labels, inplace_backward=True)
    with pytest.raises(RuntimeError, match=r"inplace_backward=True\) does not support create_graph=True"):
        torch.autograd.grad(out.sum(), leaf, create_graph=True)


@pytest.mark.parametrize("view", ["expand", "as_strided"])
def test_inplace_backward_refuses_aliased_logits(view):
    """Rows sharing memory would each write their gradient into the same slots (once a 0.43 error)."""
    base = logits[:1].clone().requires_grad_() if view == "expand" else logits.clone().requires_grad_()
    aliased = base.expand(4, -1, -1) if view == "expand" else base.as_strided((4, 5, 11), (11, 11, 1))
    with pytest.raises(ValueError, match="inplace_backward=True needs logits whose elements do not share memory"):
        ak.sequence_logps(aliased, labels, inplace_backward=True)
    # the ordinary backward is right on aliased logits: the gradient of a dense copy, summed over the aliases
    (grad,) = torch.autograd.grad(ak.sequence_logps(aliased, labels).sum(), base)
    dense = aliased.detach().clone().requires_grad_()
    (dense_grad,) = torch.autograd.grad(ak.sequence_logps(dense, labels).sum(), dense)
    if view == "expand":
        torch.testing.assert_close(grad, dense_grad.sum(0, keepdim=True))
    else:
        scattered = torch.zeros(base.numel(), dtype=base.dtype)
        index = torch.arange(base.numel()).view_as(base).as_strided((4, 5, 11), (11, 11, 1))
        scattered.index_add_(0, index.reshape(-1), dense_grad.reshape(-1))
        torch.testing.assert_close(grad, scattered.view_as(base))
