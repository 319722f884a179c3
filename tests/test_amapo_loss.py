"""amapo_loss / amapo_loss_from_logits / AMaPOLoss against the fp64 reference."""

import math

import pytest
import torch
from helpers import (assert_within_rule, conditioning_floor, logps_rounding_floors, peaked_logits, random_labels,
                     softmax_grad_floor)
from hypothesis import given
from hypothesis import strategies as st

import amapo_kernels as ak
from amapo_kernels import amapo as amapo_module
from amapo_kernels import reference as ref
from amapo_kernels.sequence_logps import sequence_logps


def pair_logps(batch, generator, *, spread=1.0, device="cpu", dtype=torch.float32):
    """Length-normalized log-probs as a policy gives them: negative, chosen a little above rejected."""
    chosen = -1.5 + spread * torch.randn(batch, generator=generator, dtype=torch.float64)
    rejected = -1.7 + spread * torch.randn(batch, generator=generator, dtype=torch.float64)
    return chosen.to(dtype).to(device), rejected.to(dtype).to(device)


def fp64_loss_and_grads(loss_fn, **hparams):
    """A function of fp64 inputs giving [loss, its gradients]: what conditioning_floor perturbs."""
    def run(*inputs):
        leaves = [x.requires_grad_() if x.is_floating_point() else x for x in inputs]
        loss = loss_fn(*leaves, **hparams)
        return [loss, *torch.autograd.grad(loss, [x for x in leaves if x.is_floating_point()])]

    return run


def check_loss_against_reference(chosen, rejected, **hparams):
    """Loss and gradients of amapo_loss vs the fp64 reference and vs the reference in the inputs' dtype."""
    results = {}
    for name, fn, dtype in (
        ("kernel", ak.amapo_loss, chosen.dtype),
        ("fp64", ref.amapo_loss, torch.float64),
        ("same", ref.amapo_loss, chosen.dtype),
    ):
        c = chosen.detach().to(dtype).requires_grad_()
        r = rejected.detach().to(dtype).requires_grad_()
        loss = fn(c, r, **hparams)
        results[name] = (loss, *torch.autograd.grad(loss, (c, r)))
    kernel, fp64, same = results["kernel"], results["fp64"], results["same"]
    conditioning = conditioning_floor(fp64_loss_and_grads(ref.amapo_loss, **hparams), [chosen, rejected], chosen.dtype)
    assert kernel[0].dtype == chosen.dtype and kernel[0].dim() == 0
    assert_within_rule(kernel[0], fp64[0], same[0], k=2, dtype=chosen.dtype, what="loss", conditioning=conditioning[0])
    assert_within_rule(kernel[1], fp64[1], same[1], k=3, dtype=chosen.dtype, what="grad chosen",
                       conditioning=conditioning[1])
    assert_within_rule(kernel[2], fp64[2], same[2], k=3, dtype=chosen.dtype, what="grad rejected",
                       conditioning=conditioning[2])
    return kernel


@given(
    batch=st.integers(1, 64),
    beta=st.sampled_from([0.5, 2.0, 3.0]),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    variant=st.sampled_from(ak.VARIANTS),
    ablation=st.sampled_from(ak.ABLATIONS),
    spread=st.sampled_from([0.05, 1.0, 5.0]),
    seed=st.integers(0, 2**20),
)
def test_matches_reference(device, batch, beta, label_smoothing, variant, ablation, spread, seed):
    generator = torch.Generator().manual_seed(seed)
    chosen, rejected = pair_logps(batch, generator, spread=spread, device=device)
    check_loss_against_reference(
        chosen, rejected, beta=beta, label_smoothing=label_smoothing, variant=variant, ablation=ablation
    )


@pytest.mark.parametrize("variant", ak.VARIANTS)
@pytest.mark.parametrize("ablation", ak.ABLATIONS)
def test_float64_inputs(device, variant, ablation):
    """fp64 in, fp64 out: nothing finer to compare with, so a tight relative tolerance instead of the rule."""
    generator = torch.Generator().manual_seed(6)
    chosen, rejected = pair_logps(32, generator, device=device, dtype=torch.float64)
    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    c64, r64 = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    loss = ak.amapo_loss(c, r, variant=variant, ablation=ablation, label_smoothing=0.1)
    expected = ref.amapo_loss(c64, r64, variant=variant, ablation=ablation, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    for grad, grad64 in zip(torch.autograd.grad(loss, (c, r)), torch.autograd.grad(expected, (c64, r64))):
        torch.testing.assert_close(grad, grad64, rtol=1e-12, atol=1e-14)


def test_margin_by_hand():
    """Two pairs, d = (1, 3): mu = 2, sd = sqrt(2); only the first is below the mean.
    code: m_1 = beta * exp(((2 - 1) / sqrt 2) * 2);  paper: m_1 = beta * exp(((2 - 1) / sqrt 2) * beta * 2)."""
    chosen = torch.tensor([0.0, 0.0], dtype=torch.float64)
    rejected = torch.tensor([-1.0, -3.0], dtype=torch.float64)
    beta = 2.0
    _, stats = ak.amapo_loss(chosen, rejected, beta=beta, return_stats=True)
    expected = beta * math.exp(2 / math.sqrt(2))
    torch.testing.assert_close(stats["adaptive_margin"], torch.tensor([expected, 0.0], dtype=torch.float64))
    assert stats["batch_margin_mean"].item() == pytest.approx(2.0)
    assert stats["batch_margin_std"].item() == pytest.approx(math.sqrt(2))
    loss = ak.amapo_loss(chosen, rejected, beta=beta)
    by_hand = (math.log1p(math.exp(-(beta * 1 - expected))) + math.log1p(math.exp(-beta * 3))) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-12)
    _, paper = ak.amapo_loss(chosen, rejected, beta=beta, variant="paper", return_stats=True)
    assert paper["adaptive_margin"][0].item() == pytest.approx(beta * math.exp(2 / math.sqrt(2) * beta))


def test_one_pair_and_zero_spread_give_zero_margin(device):
    for chosen, rejected in (([-1.0], [-2.0]), ([-1.0, -3.0, 0.5], [-2.0, -4.0, -0.5])):
        c = torch.tensor(chosen, device=device, requires_grad=True)
        r = torch.tensor(rejected, device=device)
        for variant in ak.VARIANTS:
            for ablation in ak.ABLATIONS:
                loss, stats = ak.amapo_loss(c, r, variant=variant, ablation=ablation, return_stats=True)
                assert torch.count_nonzero(stats["adaptive_margin"]) == 0
                assert stats["batch_margin_std"].item() == 0.0
                expected = torch.nn.functional.softplus(-2.0 * (c - r)).mean()
                torch.testing.assert_close(loss, expected)
                (grad,) = torch.autograd.grad(loss, c)
                assert torch.isfinite(grad).all()


def test_exponent_is_clamped(device):
    """One pair far below a large mean: z * mu is in the thousands; the margin caps at beta * e^50."""
    chosen = torch.tensor([-0.1] * 7 + [-400.0], device=device, requires_grad=True)
    rejected = torch.tensor([-100.0] * 7 + [-0.1], device=device)
    loss, stats = ak.amapo_loss(chosen, rejected, beta=2.0, return_stats=True)
    assert stats["adaptive_margin"][-1].item() == pytest.approx(2.0 * math.exp(50.0), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, chosen)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    check_loss_against_reference(chosen.detach(), rejected, beta=2.0)


def test_return_stats_names_and_values(device):
    generator = torch.Generator().manual_seed(4)
    chosen, rejected = pair_logps(8, generator, device=device)
    loss, stats = ak.amapo_loss(chosen, rejected, beta=2.5, return_stats=True)
    assert set(stats) == {
        "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "batch_margin_mean", "batch_margin_std", "adaptive_margin",
    }
    assert all(not value.requires_grad for value in stats.values())
    torch.testing.assert_close(stats["rewards/chosen"], 2.5 * chosen.mean())
    torch.testing.assert_close(stats["rewards/margins"], 2.5 * (chosen - rejected).mean())
    torch.testing.assert_close(stats["rewards/accuracies"], (chosen > rejected).float().mean())
    d = chosen.double() - rejected.double()
    assert stats["batch_margin_mean"].item() == pytest.approx(d.mean().item(), rel=1e-12)
    assert stats["batch_margin_std"].item() == pytest.approx(d.std().item(), rel=1e-9)
    torch.testing.assert_close(stats["adaptive_margin"], ref.amapo_margin(chosen.double(), rejected.double(),
                                                                          beta=2.5).float())


@given(
    pairs=st.integers(1, 3),
    steps=st.integers(1, 7),
    vocab=st.sampled_from([3, 50, 257]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    shift=st.booleans(),
    variant=st.sampled_from(ak.VARIANTS),
    ignore_prob=st.sampled_from([0.0, 0.4]),
    seed=st.integers(0, 2**20),
)
def test_from_logits_matches_reference(device, pairs, steps, vocab, dtype, shift, variant, ignore_prob, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = peaked_logits(2 * pairs, steps, vocab, dtype=dtype, generator=generator, device=device)
    labels = random_labels(2 * pairs, steps, vocab, ignore_prob=ignore_prob, generator=generator, device=device,
                           all_ignored_rows=[1] if pairs > 1 else ())
    kwargs = dict(beta=2.0, shift=shift, variant=variant, label_smoothing=0.05)
    leaves = [logits.detach().requires_grad_(), logits.detach().double().requires_grad_(),
              logits.detach().requires_grad_()]
    # torch in the logits' dtype for the token log-probs, then fp32 (the API's log-prob dtype) for the loss
    same_logps = ref.sequence_logps(leaves[2], labels, shift=shift).float()
    losses = [ak.amapo_loss_from_logits(leaves[0], labels, **kwargs),
              ref.amapo_loss_from_logits(leaves[1], labels, **kwargs),
              ref.amapo_loss(same_logps[:pairs], same_logps[pairs:], beta=2.0, variant=variant, label_smoothing=0.05)]
    grads = [torch.autograd.grad(loss, leaf)[0] for loss, leaf in zip(losses, leaves)]
    from_logits = fp64_loss_and_grads(lambda x, y: ref.amapo_loss_from_logits(x, y, **kwargs))
    conditioning = conditioning_floor(from_logits, [logits, labels], torch.float32)  # the kernels compute in fp32
    logps64 = ref.sequence_logps(logits.detach().double(), labels, shift=shift).requires_grad_()

    def loss_of_logps(logps):
        return ref.amapo_loss(logps[:pairs], logps[pairs:], beta=2.0, variant=variant, label_smoothing=0.05)

    value_floor, coefficient_floor = logps_rounding_floors(loss_of_logps, logps64, labels, shift=shift)
    assert_within_rule(losses[0], losses[1], losses[2], k=2, dtype=torch.float32, what="loss",
                       conditioning=max(conditioning[0], value_floor))
    (row_grads,) = torch.autograd.grad(loss_of_logps(logps64), logps64)
    grad_floor = max(conditioning[1], coefficient_floor, softmax_grad_floor(row_grads, labels, shift=shift,
                                                                            average=True))
    assert_within_rule(grads[0], grads[1], grads[2], k=3, dtype=dtype, what="grad logits", conditioning=grad_floor)


def test_module_matches_function(device):
    generator = torch.Generator().manual_seed(5)
    logits = peaked_logits(4, 6, 40, dtype=torch.float32, generator=generator, device=device)
    labels = random_labels(4, 6, 40, ignore_prob=0.2, generator=generator, device=device)
    module = ak.AMaPOLoss(beta=3.0, shift=True, variant="paper")
    expected = ak.amapo_loss_from_logits(logits, labels, beta=3.0, shift=True, variant="paper")
    assert torch.equal(module(logits, labels), expected)
    assert "beta=3.0" in repr(module)


def test_module_passes_inplace_backward_and_check_labels(device, monkeypatch):
    """AMaPOLoss(inplace_backward=True) writes the function's gradient over the logits (the module's forward
    passes the switch: without it the logits keep their values); check_labels=False reaches sequence_logps
    too (on CUDA an out-of-range label is then NaN instead of the range check's ValueError; the CPU always
    checks)."""
    generator = torch.Generator().manual_seed(6)
    logits = peaked_logits(4, 6, 40, dtype=torch.float32, generator=generator, device=device)
    labels = random_labels(4, 6, 40, ignore_prob=0.2, generator=generator, device=device)
    leaf = logits.detach().requires_grad_()
    (expected,) = torch.autograd.grad(ak.amapo_loss_from_logits(leaf, labels, shift=True), leaf)
    overwritten = logits.detach().requires_grad_().clone()  # a non-leaf: its memory takes the gradient
    ak.AMaPOLoss(shift=True, inplace_backward=True)(overwritten, labels).backward()
    assert torch.equal(overwritten.detach(), expected)
    assert "inplace_backward=True" in repr(ak.AMaPOLoss(inplace_backward=True))
    seen = []
    monkeypatch.setattr(amapo_module, "sequence_logps",
                        lambda *args, **kwargs: seen.append(kwargs["check_labels"]) or sequence_logps(*args, **kwargs))
    ak.AMaPOLoss(shift=True, check_labels=False)(logits, labels)
    ak.AMaPOLoss(shift=True)(logits, labels)
    assert seen == [False, True]
    labels[0, 3] = 40
    with pytest.raises(ValueError, match="labels must lie in"):
        ak.AMaPOLoss(shift=True)(logits, labels)
    if device == "cuda":
        assert ak.AMaPOLoss(shift=True, check_labels=False)(logits, labels).isnan()


@pytest.mark.parametrize("variant", ak.VARIANTS)
@pytest.mark.parametrize("ablation", ak.ABLATIONS)
def test_non_finite_gap_follows_the_formula(device, variant, ablation):
    """A rejected log-prob of -inf (d = +inf) or a NaN log-prob makes the batch's M2 NaN: its std is NaN and
    the margins are the formula's (NaN where gated), as the fp64 reference's; before, a NaN std was taken
    for "no spread" and every margin dropped, which gave finite gradients where the formula's are NaN."""
    for poison in (float("-inf"), float("nan")):
        chosen = torch.tensor([-1.0, -2.0, -1.5, -0.5], dtype=torch.float64, device=device, requires_grad=True)
        rejected = torch.tensor([poison, -1.0, -2.0, -1.0], dtype=torch.float64, device=device)
        loss, stats = ak.amapo_loss(chosen, rejected, variant=variant, ablation=ablation, return_stats=True)
        (grad,) = torch.autograd.grad(loss, chosen)
        chosen64 = chosen.detach().cpu().requires_grad_()
        loss64 = ref.amapo_loss(chosen64, rejected.cpu(), variant=variant, ablation=ablation)
        (grad64,) = torch.autograd.grad(loss64, chosen64)
        assert stats["batch_margin_std"].isnan()
        torch.testing.assert_close(loss.cpu(), loss64, equal_nan=True)
        torch.testing.assert_close(grad.cpu(), grad64, equal_nan=True)
        assert torch.equal(grad.isnan().cpu(), grad64.isnan())
        if ablation is None and (poison != poison or variant == "code"):  # the case the old kernel got wrong
            assert grad64.isnan().any()


def test_a_pair_at_the_mean_has_no_margin(device):
    """d = (1, 2, 3): the middle pair's d equals the batch mean exactly. The margin is for pairs below the mean
    (d_i < mu), so the middle pair's is 0 in both variants, in the ops and in the fp64 reference (a gate
    d_i <= mu would give it beta * e^0 = beta). Before this test only the d = +inf case reached the gate's edge."""
    chosen = torch.zeros(3, dtype=torch.float64, device=device)
    rejected = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64, device=device)
    for variant in ak.VARIANTS:
        _, stats = ak.amapo_loss(chosen, rejected, variant=variant, return_stats=True)
        margins = stats["adaptive_margin"].cpu()
        assert margins[0].item() > 0 and margins[1].item() == 0.0 and margins[2].item() == 0.0
        assert torch.equal(ref.amapo_margin(chosen.cpu(), rejected.cpu(), variant=variant) == 0, margins == 0)
        check_loss_against_reference(chosen.float(), rejected.float(), variant=variant)


def test_paper_statistics_are_of_the_reward(device):
    """variant="paper" takes the batch statistics of the reward r = beta * d (Eq. 9-10), and reports them: d = (1, 3)
    with beta = 2 gives a mean of 4 and a std of 2 sqrt 2 (the code variant's, of d, are 2 and sqrt 2)."""
    chosen = torch.tensor([0.0, 0.0], dtype=torch.float64, device=device)
    rejected = torch.tensor([-1.0, -3.0], dtype=torch.float64, device=device)
    for variant, unit in (("paper", 2.0), ("code", 1.0)):
        _, stats = ak.amapo_loss(chosen, rejected, beta=2.0, variant=variant, return_stats=True)
        assert stats["batch_margin_mean"].item() == pytest.approx(2.0 * unit, rel=1e-12)
        assert stats["batch_margin_std"].item() == pytest.approx(math.sqrt(2) * unit, rel=1e-12)


def test_reward_metrics_by_hand(device):
    """TRL's reward metrics, by hand: rewards/chosen and rewards/rejected are beta times the mean log-probs, and a
    tie (chosen == rejected) is not an accurate pair (TRL: chosen_rewards > rejected_rewards)."""
    chosen = torch.tensor([-1.0, -2.0, -1.5, -0.5], device=device)
    rejected = torch.tensor([-1.0, -2.5, -1.5, -0.25], device=device)
    _, stats = ak.amapo_loss(chosen, rejected, beta=2.5, return_stats=True)
    assert stats["rewards/accuracies"].item() == 0.25  # one pair of four strictly above, two ties
    assert stats["rewards/chosen"].item() == pytest.approx(2.5 * -5.0 / 4, rel=1e-6)
    assert stats["rewards/rejected"].item() == pytest.approx(2.5 * -5.25 / 4, rel=1e-6)
    assert stats["rewards/margins"].item() == pytest.approx(2.5 * 0.25 / 4, rel=1e-6)


def test_custom_ignore_index(device):
    """An ignore_index other than -100 reaches the log-probs through amapo_loss_from_logits and AMaPOLoss: loss and
    logits gradient against the fp64 reference with the same ignore_index (-1 here: a label of -1 taken for a
    token would be out of range, an error)."""
    generator = torch.Generator().manual_seed(11)
    logits = peaked_logits(4, 6, 40, dtype=torch.float32, generator=generator, device=device)
    labels = random_labels(4, 6, 40, ignore_prob=0.3, generator=generator, device=device, ignore_index=-1)
    assert (labels[:, 1:] == -1).any()  # scored positions that are ignored: the test can fail
    kwargs = dict(beta=2.0, ignore_index=-1, shift=True)
    leaves = [logits.detach().requires_grad_(), logits.detach().double().requires_grad_(),
              logits.detach().requires_grad_()]
    losses = [ak.amapo_loss_from_logits(leaves[0], labels, **kwargs),
              ref.amapo_loss_from_logits(leaves[1], labels, **kwargs),
              ref.amapo_loss_from_logits(leaves[2], labels, **kwargs)]
    grads = [torch.autograd.grad(loss, leaf)[0] for loss, leaf in zip(losses, leaves)]
    from_logits = fp64_loss_and_grads(lambda x, y: ref.amapo_loss_from_logits(x, y, **kwargs))
    conditioning = conditioning_floor(from_logits, [logits, labels], torch.float32)
    logps64 = ref.sequence_logps(logits.detach().double(), labels, ignore_index=-1, shift=True).requires_grad_()
    value_floor, coefficient_floor = logps_rounding_floors(lambda logps: ref.amapo_loss(logps[:2], logps[2:], beta=2.0),
                                                          logps64, labels, shift=True, ignore_index=-1)
    assert_within_rule(losses[0], losses[1], losses[2], k=2, dtype=torch.float32, what="loss",
                       conditioning=max(conditioning[0], value_floor))
    (row_grads,) = torch.autograd.grad(ref.amapo_loss(logps64[:2], logps64[2:], beta=2.0), logps64)
    grad_floor = max(conditioning[1], coefficient_floor,
                     softmax_grad_floor(row_grads, labels, shift=True, average=True, ignore_index=-1))
    assert_within_rule(grads[0], grads[1], grads[2], k=3, dtype=torch.float32, what="grad logits",
                       conditioning=grad_floor)
    assert torch.equal(ak.AMaPOLoss(**kwargs)(logits, labels), losses[0].detach())


def test_mixed_dtypes_compute_in_the_promoted_dtype(device):
    """chosen and rejected log-probs of different dtypes compute in torch's promoted dtype, in either order: an
    fp64 side is never rounded to fp32 because the other is fp32."""
    generator = torch.Generator().manual_seed(12)
    chosen, rejected = pair_logps(8, generator, device=device, dtype=torch.float64)
    for c, r in ((chosen.float(), rejected), (chosen, rejected.float())):
        loss = ak.amapo_loss(c, r)
        assert loss.dtype == torch.float64
        assert torch.equal(loss, ak.amapo_loss(c.double(), r.double()))


def test_a_loss_beyond_float32_is_inf_not_an_error(device):
    """beta = 1e20 is a valid beta; with the exponent at its cap the fp64 loss (1.3e39) is beyond float32, whose
    loss is then inf, as the CUDA kernel's static_cast gives (before, on the CPU: RuntimeError "value cannot be
    converted to type float without overflow", from fill_)."""
    chosen, rejected = torch.tensor([100.0, 100.0, 100.0, -100.0], device=device), torch.zeros(4, device=device)
    expected = ref.amapo_loss(chosen.double().cpu(), rejected.double().cpu(), beta=1e20)
    assert expected.item() > torch.finfo(torch.float32).max
    loss = ak.amapo_loss(chosen, rejected, beta=1e20)
    assert loss.item() == math.inf
    torch.testing.assert_close(ak.amapo_loss(chosen.double(), rejected.double(), beta=1e20).cpu(), expected)


def margins_of(impl, chosen, rejected, **options):
    """Per-pair margins from the op (amapo_loss's stats) or from the fp64 reference."""
    if impl == "op":
        _, stats = ak.amapo_loss(chosen, rejected, return_stats=True, **options)
        return stats["adaptive_margin"].tolist()
    return ref.amapo_margin(chosen, rejected, **options).tolist()


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_paper_no_adaptive_gates_as_eq8(impl):
    """Eq. 8: gamma = I[(gamma* - r) > 0] * gamma*, gamma* = mu_r: the constant margin goes to the pairs whose
    reward is below the batch mean whatever the sign of mu_r (the paper variant gated on z * mu_r > 0, which for
    mu_r < 0 picked the best-ranked pairs instead). Worked out by hand, not from the reference."""
    chosen = torch.tensor([-2.0, -1.5, -1.0], dtype=torch.float64)  # d = [-1, -0.5, 0], beta 2: r = [-2, -1, 0]
    rejected = torch.full((3,), -1.0, dtype=torch.float64)
    assert margins_of(impl, chosen, rejected, beta=2.0, variant="paper", ablation="no_adaptive") == [-1.0, 0.0, 0.0]
    # mu_r > 0: both gates agree
    assert margins_of(impl, rejected, chosen, beta=2.0, variant="paper", ablation="no_adaptive") == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_paper_no_zero_keeps_eq9_max(impl):
    """'no_zero' removes only Eq. 10's h(0) = 0: with Eq. 9's gamma = max(z * mu_r, 0) a correctly ranked pair
    gets beta * e^0 = beta, never less (the max was dropped: beta * e^(z * mu_r) < beta)."""
    chosen = torch.tensor([-1.0, -0.5, 0.0], dtype=torch.float64)  # d = [0, 0.5, 1], beta 2: z = [1, 0, -1], mu_r 1
    rejected = torch.full((3,), -1.0, dtype=torch.float64)
    margins = margins_of(impl, chosen, rejected, beta=2.0, variant="paper", ablation="no_zero")
    assert margins == pytest.approx([2.0 * math.e, 2.0, 2.0], rel=1e-15)
