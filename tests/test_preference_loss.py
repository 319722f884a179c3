"""preference_loss: every method against the textbook reference, values and gradients."""

import contextlib
import copy
import math
import statistics

import pytest
import torch
from helpers import assert_within_rule, conditioning_floor
from hypothesis import given
from hypothesis import strategies as st

import amapo_kernels as ak
from amapo_kernels import reference as ref
from amapo_kernels.preference import BASELINES

# A second hyperparameter setting per method, away from the defaults.
OTHER_HPARAMS = {
    "dpo": {"beta": 0.5, "label_smoothing": 0.1},
    "ipo": {"tau": 0.5},
    "slic": {"delta": 0.5, "nll_weight": 1.0},
    "cpo": {"beta": 0.05, "nll_weight": 0.5},
    "odpo": {"beta": 0.3, "alpha": 0.5},
    "kto": {"beta": 0.05, "desirable_weight": 1.33, "undesirable_weight": 1.0},
    "simpo": {"beta": 2.5, "gamma": 1.4},
    "focalpo": {"beta": 0.2, "gamma": 0.5},
    "alpha_dpo": {"beta": 10.0, "gamma": 4.0, "alpha": 0.05, "label_smoothing": 0.1},
    "amapo": {"beta": 3.0, "variant": "paper"},
}


def make_inputs(method, batch, generator, dtype):
    mean = LOGPS_MEAN[getattr(BASELINES.get(method), "LOGPS", "mean")]
    tensors = [mean + mean / 4 * torch.randn(batch, generator=generator, dtype=torch.float64) for _ in range(4)]
    extra = {}
    if method == "odpo":
        rejected_scores = torch.rand(batch, generator=generator, dtype=torch.float64)
        extra = {"chosen_scores": rejected_scores + 0.1 + torch.rand(batch, generator=generator, dtype=torch.float64),
                 "rejected_scores": rejected_scores}
    return [t.to(dtype) for t in tensors], extra


LOGPS_MEAN = {"sum": -120.0, "mean": -1.5}


def losses_and_grads(fn, tensors, dtype, **kwargs):
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    loss = fn(leaves[0], leaves[1], ref_chosen_logps=leaves[2], ref_rejected_logps=leaves[3], **kwargs)
    return loss, torch.autograd.grad(loss, leaves[:2])


@given(
    method=st.sampled_from(ak.METHODS),
    batch=st.integers(1, 32),
    other=st.booleans(),
    seed=st.integers(0, 2**20),
)
def test_matches_reference(method, batch, other, seed):
    generator = torch.Generator().manual_seed(seed)
    tensors, extra = make_inputs(method, batch, generator, torch.float32)
    kwargs = {**(OTHER_HPARAMS[method] if other else {}), **extra}
    loss, grads = losses_and_grads(ak.preference_loss, tensors, torch.float32, method=method, **kwargs)
    loss64, grads64 = losses_and_grads(ref.preference_loss, tensors, torch.float64, method=method, **kwargs)
    loss32, grads32 = losses_and_grads(ref.preference_loss, tensors, torch.float32, method=method, **kwargs)
    def fp64(*leaves):
        loss, grads = losses_and_grads(ref.preference_loss, leaves, torch.float64, method=method, **kwargs)
        return [loss, *grads]

    conditioning = conditioning_floor(fp64, tensors, torch.float32)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_within_rule(loss, loss64, loss32, k=2, dtype=torch.float32, what=f"{method} loss",
                       conditioning=conditioning[0])
    for grad, grad64, grad32, floor in zip(grads, grads64, grads32, conditioning[1:]):
        assert_within_rule(grad, grad64, grad32, k=3, dtype=torch.float32, what=f"{method} grad", conditioning=floor)


@pytest.mark.parametrize("other", [False, True])
@pytest.mark.parametrize("method", ak.METHODS)
def test_float64(method, other):
    """Both hyperparameter settings of every method, deterministically (test_matches_reference draws them at random:
    its examples had left DPO's label smoothing unexercised)."""
    generator = torch.Generator().manual_seed(7)
    tensors, extra = make_inputs(method, 16, generator, torch.float64)
    kwargs = {**(OTHER_HPARAMS[method] if other else {}), **extra}
    loss, grads = losses_and_grads(ak.preference_loss, tensors, torch.float64, method=method, **kwargs)
    loss64, grads64 = losses_and_grads(ref.preference_loss, tensors, torch.float64, method=method, **kwargs)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, loss64, rtol=1e-12, atol=1e-14)
    for grad, grad64 in zip(grads, grads64):
        torch.testing.assert_close(grad, grad64, rtol=1e-10, atol=1e-14)


# Hyperparameters that put each sigmoid method's argument at exactly 0 when policy == reference and chosen ==
# rejected (the first step of a DPO run): no SimPO / alpha-DPO offset, an ODPO score gap of 1 (log 1 = 0).
AT_ZERO = {"simpo": {"gamma": 0.0}, "alpha_dpo": {"gamma": 0.0},
           "odpo": {"chosen_scores": torch.full((4,), 1.5, dtype=torch.float64),
                    "rejected_scores": torch.full((4,), 0.5, dtype=torch.float64)}}


@pytest.mark.parametrize("method", ak.METHODS)
def test_matches_reference_where_the_argument_is_zero(method):
    """At a zero argument, the reference has the exact derivative (-1/2 of -logsigmoid's at 0; before, its
    overflow-safe clamp + abs form had autograd's 0 there) and the ops match it, values and gradients."""
    logps = torch.full((4,), -1.5, dtype=torch.float64)
    tensors = [logps + 0.25 * torch.arange(4, dtype=torch.float64)] * 4
    loss, grads = losses_and_grads(ak.preference_loss, tensors, torch.float64, method=method, **AT_ZERO.get(method, {}))
    loss64, grads64 = losses_and_grads(ref.preference_loss, tensors, torch.float64, method=method,
                                       **AT_ZERO.get(method, {}))
    torch.testing.assert_close(loss, loss64, rtol=1e-12, atol=1e-14)
    for grad, grad64 in zip(grads, grads64):
        torch.testing.assert_close(grad, grad64, rtol=1e-10, atol=1e-14)
    if method in ("dpo", "simpo", "amapo"):  # d loss / d chosen_i = -beta / 2 / B (label smoothing 0)
        beta = ak.preference.method_defaults(method)["beta"]
        torch.testing.assert_close(grads64[0], torch.full((4,), -beta / 2 / 4, dtype=torch.float64))


def test_values_by_hand():
    zero = torch.zeros(3, dtype=torch.float64)
    ones = torch.ones(3, dtype=torch.float64)
    refs = dict(ref_chosen_logps=zero, ref_rejected_logps=zero)
    # h = 0: DPO = log 2; IPO = (1 / (2 tau))^2; FocalPO = 0.5**gamma * log 2
    assert ak.preference_loss(zero, zero, method="dpo", **refs).item() == pytest.approx(math.log(2))
    assert ak.preference_loss(zero, zero, method="ipo", **refs).item() == pytest.approx(25.0)
    assert ak.preference_loss(zero, zero, method="focalpo", **refs).item() == pytest.approx(0.5**0.05 * math.log(2))
    # SimPO with gap 1, beta 2, gamma 1: -logsigmoid(1); SLiC rank: max(0, 1 - 1) - 0.1 * lc
    assert ak.preference_loss(ones, zero, method="simpo").item() == pytest.approx(math.log1p(math.exp(-1)))
    assert ak.preference_loss(ones, zero, method="slic").item() == pytest.approx(-0.1)
    assert ak.preference_loss(ones, zero, method="cpo").item() == pytest.approx(math.log1p(math.exp(-0.1)) - 1)
    # KTO at zero log-ratios: z = 0, each of the 2B example terms (1 - sigmoid(0)) = 0.5, and their mean 0.5
    assert ak.preference_loss(zero, zero, method="kto", **refs).item() == pytest.approx(0.5)
    # ODPO with score gap e: offset alpha * 1
    scores = dict(chosen_scores=torch.full((3,), math.e), rejected_scores=torch.zeros(3))
    assert ak.preference_loss(zero, zero, method="odpo", **refs, **scores).item() == pytest.approx(math.log1p(math.e))


def test_amapo_method_is_amapo_loss():
    generator = torch.Generator().manual_seed(8)
    chosen, rejected = torch.randn(10, generator=generator) - 1, torch.randn(10, generator=generator) - 1.2
    assert torch.equal(ak.preference_loss(chosen, rejected, method="amapo", beta=3.0),
                       ak.amapo_loss(chosen, rejected, beta=3.0))


def test_slic_hinge_form_needs_reference():
    chosen, rejected = torch.zeros(2), torch.zeros(2)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        ak.preference_loss(chosen, rejected, method="slic", form="hinge")
    loss = ak.preference_loss(chosen, rejected, method="slic", form="hinge", tau=2.0,
                              ref_chosen_logps=torch.full((2,), -0.25), ref_rejected_logps=torch.zeros(2))
    assert loss.item() == pytest.approx(max(0.0, 1 - 2.0 * 0.25))


@pytest.mark.parametrize("method", ak.METHODS)
@pytest.mark.parametrize("poisoned", ["chosen", "ref_rejected"])
def test_a_nan_log_prob_is_never_hidden(method, poisoned):
    """A NaN log-prob gives a NaN loss for every method, as in the reference: alpha-DPO once took the NaN
    spread of its z-score for "no spread" (dropping the term for every pair) and FocalPO took NaN for the
    -inf limit (a loss of 0 there): both reported a finite loss."""
    if poisoned == "ref_rejected" and not ak.preference.needs_reference(method, {}):
        pytest.skip("reference-free method")
    tensors, extra = make_inputs(method, 4, torch.Generator().manual_seed(5), torch.float64)
    tensors[{"chosen": 0, "ref_rejected": 3}[poisoned]][0] = float("nan")
    loss, _ = losses_and_grads(ak.preference_loss, tensors, torch.float64, method=method, **extra)
    loss64, _ = losses_and_grads(ref.preference_loss, tensors, torch.float64, method=method, **extra)
    assert loss.isnan() and loss64.isnan()


def test_alpha_dpo_infinite_log_ratio_gap_is_nan():
    """alpha-DPO's z-score of M = u - (rc - rr) with rr = -inf: the official (M - mean) / std is NaN."""
    tensors, _ = make_inputs("alpha_dpo", 4, torch.Generator().manual_seed(6), torch.float64)
    tensors[3][0] = float("-inf")
    loss, grads = losses_and_grads(ak.preference_loss, tensors, torch.float64, method="alpha_dpo")
    loss64, grads64 = losses_and_grads(ref.preference_loss, tensors, torch.float64, method="alpha_dpo")
    assert loss.isnan() and loss64.isnan()
    for grad, grad64 in zip(grads, grads64):
        torch.testing.assert_close(grad, grad64, equal_nan=True)


@pytest.mark.parametrize("method", ["focalpo", "kto"])
def test_reference_is_accurate_in_the_tails(method):
    """The fp64 reference of FocalPO and KTO at large DPO logits x, against closed forms: once written with
    1 / (1 + exp(-x)), it lost 1e-3 relative at x = 30 and gave 0 at x = 400 (true: 1.9e-174), so that the
    tolerance rule failed for ops that were right."""
    beta = 0.1
    for x in (30.0, 400.0):
        zero = torch.zeros(1, dtype=torch.float64)
        h = torch.full((1,), x / beta, dtype=torch.float64)
        refs = {"ref_chosen_logps": zero, "ref_rejected_logps": zero}
        if method == "focalpo":  # -(sigmoid(x) ** gamma) * logsigmoid(x), logsigmoid(x) = -log1p(exp(-x))
            gamma = 0.05
            expected = (1 + math.exp(-x)) ** -gamma * math.log1p(math.exp(-x))
            hparams = {"beta": beta, "gamma": gamma}
            chosen, rejected = h, zero
        else:  # one pair with lc - rc = x / beta, lr - rr = 0: z_c = x / beta, z_r = 0;
            # the loss is (sigmoid(-x) + sigmoid(-beta * (z_c - 0))) / 2 = sigmoid(-x)
            expected = math.exp(-x) / (1 + math.exp(-x))
            hparams = {"beta": beta}
            chosen, rejected = h, zero
        for fn in (ref.preference_loss, ak.preference_loss):
            loss = fn(chosen, rejected, method=method, **refs, **hparams).item()
            assert loss == pytest.approx(expected, rel=1e-12, abs=0), (fn.__module__, x)


def test_group_is_a_keyword_of_the_methods_with_batch_statistics():
    """group= (the ranks sharing the batch statistics) is taken by amapo, alpha_dpo and kto, and refused by
    a method whose pair losses are the pair's own, naming the methods' hyperparameters."""
    tensors, _ = make_inputs("kto", 4, torch.Generator().manual_seed(9), torch.float64)
    refs = {"ref_chosen_logps": tensors[2], "ref_rejected_logps": tensors[3]}
    assert [m for m in ak.METHODS if ak.preference.batch_statistics_of(m)] == ["kto", "alpha_dpo", "amapo"]
    for method in ("kto", "alpha_dpo", "amapo"):
        torch.testing.assert_close(ak.preference_loss(*tensors[:2], method=method, group=None, **refs),
                                   ak.preference_loss(*tensors[:2], method=method, **refs))
    with pytest.raises(TypeError, match=r"method='dpo' has no hyperparameter \['group'\]"):
        ak.preference_loss(*tensors[:2], method="dpo", group=None, **refs)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_alpha_dpo_by_hand(eps):
    """alpha-DPO at its paper's defaults (beta 2.5, gamma 1.5, alpha 0.2), ops and fp64 reference against the closed
    form (1 - eps) softplus(-x_i) + eps softplus(x_i) (eps the label smoothing its official trainer applies),
    x_i = beta * u_i - gamma - beta * alpha * z_i, z the z-score of M = u - (rc - rr) with the unbiased std,
    detached: d loss / d chosen_i = beta * (eps - sigmoid(-x_i)) / B. The comparison with the reference alone
    cannot see a change made to both (a biased std, a default, where beta multiplies, the smoothing's sign)."""
    chosen = torch.tensor([-1.0, -1.5, -0.5], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-2.0, -1.5, -2.5], dtype=torch.float64, requires_grad=True)
    refs = {"ref_chosen_logps": torch.tensor([-1.25, -2.0, -1.0], dtype=torch.float64),
            "ref_rejected_logps": torch.tensor([-1.75, -1.5, -1.0], dtype=torch.float64)}
    u, m = [1.0, 0.0, 2.0], [0.5, 0.5, 2.0]  # rc - rr = (0.5, -0.5, 0): M has mean 1, unbiased std sqrt(3) / 2
    std = math.sqrt(sum((mi - 1.0) ** 2 for mi in m) / (len(m) - 1))
    beta, gamma, alpha = 2.5, 1.5, 0.2
    x = [beta * ui - gamma - beta * alpha * (mi - 1.0) / std for ui, mi in zip(u, m)]
    expected_loss = sum((1 - eps) * math.log1p(math.exp(-xi)) + eps * math.log1p(math.exp(xi)) for xi in x) / 3
    expected_grad = [beta * (eps - 1 / (1 + math.exp(xi))) / 3 for xi in x]
    smoothing = {"label_smoothing": eps} if eps else {}  # eps = 0 also checks the default
    for fn in (ak.preference_loss, ref.preference_loss):
        loss = fn(chosen, rejected, method="alpha_dpo", **refs, **smoothing)
        assert loss.item() == pytest.approx(expected_loss, rel=1e-12), fn.__module__
        grad_chosen, grad_rejected = torch.autograd.grad(loss, (chosen, rejected))
        assert grad_chosen.tolist() == pytest.approx(expected_grad, rel=1e-12), fn.__module__
        assert grad_rejected.tolist() == pytest.approx([-g for g in expected_grad], rel=1e-12), fn.__module__


def test_alpha_dpo_running_statistics_by_hand():
    """decay > 0: M's mean and unbiased std are decayed running values, as alpha-DPO's official trainer keeps them
    (from 0, no bias correction): after batch t, mean_t = decay * mean_{t-1} + (1 - decay) * mean(M_t), std
    likewise, and M* = (M - mean_t) / std_t. Worked out with the statistics module over three batches, ops and
    fp64 reference; frozen() reads the state without updating it; a one-pair batch leaves it as it is."""
    beta, gamma, alpha, decay = 2.5, 1.5, 0.2, 0.9
    batches = [([-1.0, -1.5, -0.5], [-2.0, -1.5, -2.5], [-1.25, -2.0, -1.0], [-1.75, -1.5, -1.0]),
               ([-0.5, -1.0, -2.0, -1.0], [-1.0, -3.0, -1.5, -1.25], [-1.0] * 4, [-1.5, -1.0, -2.0, -0.5]),
               ([-1.0, -2.0], [-1.75, -1.0], [-1.5, -1.0], [-1.0, -1.5])]
    for fn in (ak.preference_loss, ref.preference_loss):
        running, mean, std = ak.RunningStatistics(), 0.0, 0.0
        for lc, lr, rc, rr in batches:
            u = [c - r for c, r in zip(lc, lr)]
            m = [ui - (c - r) for ui, c, r in zip(u, rc, rr)]
            mean = decay * mean + (1 - decay) * statistics.mean(m)
            std = decay * std + (1 - decay) * statistics.stdev(m)
            x = [beta * ui - gamma - beta * alpha * (mi - mean) / std for ui, mi in zip(u, m)]
            tensors = [torch.tensor(v, dtype=torch.float64) for v in (lc, lr, rc, rr)]
            loss = fn(tensors[0], tensors[1], method="alpha_dpo", ref_chosen_logps=tensors[2],
                      ref_rejected_logps=tensors[3], decay=decay, running=running)
            assert running.mean_std.tolist() == pytest.approx([mean, std], rel=1e-12), fn.__module__
            assert loss.item() == pytest.approx(sum(math.log1p(math.exp(-xi)) for xi in x) / len(x), rel=1e-12)
        for frozen, pairs in ((True, 3), (False, 1)):  # evaluation, then a one-pair batch: no update
            tensors = [torch.tensor(v[:pairs], dtype=torch.float64) for v in batches[0]]
            with running.frozen() if frozen else contextlib.nullcontext():
                fn(tensors[0], tensors[1], method="alpha_dpo", ref_chosen_logps=tensors[2],
                   ref_rejected_logps=tensors[3], decay=decay, running=running)
            assert running.mean_std.tolist() == pytest.approx([mean, std], rel=1e-12), fn.__module__


def test_alpha_dpo_running_statistics_without_spread_and_across_a_checkpoint():
    """A running std of 0 (every batch so far without spread: a policy still equal to its reference, where the
    official trainer divides 0 by 0) gives z-scores of 0, the loss SimPO's; state_dict() / load_state_dict()
    carry the state, so a resumed run goes on with the same margins."""
    logps = torch.tensor([-1.0, -1.5, -0.5], dtype=torch.float64)
    refs = {"ref_chosen_logps": logps, "ref_rejected_logps": logps - 0.5}
    for fn in (ak.preference_loss, ref.preference_loss):
        running = ak.RunningStatistics()
        loss = fn(logps, logps - 0.5, method="alpha_dpo", **refs, decay=0.9, running=running)  # M = 0
        assert running.mean_std.tolist() == [0.0, 0.0]
        torch.testing.assert_close(loss, ak.preference_loss(logps, logps - 0.5, method="simpo", beta=2.5, gamma=1.5))
    tensors, _ = make_inputs("alpha_dpo", 6, torch.Generator().manual_seed(3), torch.float64)
    running = ak.RunningStatistics()
    refs = {"ref_chosen_logps": tensors[2], "ref_rejected_logps": tensors[3]}
    ak.preference_loss(*tensors[:2], method="alpha_dpo", **refs, decay=0.5, running=running)
    resumed = ak.RunningStatistics()
    resumed.load_state_dict(running.state_dict())
    assert resumed.mean_std.tolist() == running.mean_std.tolist() and resumed.mean_std.tolist()[1] > 0
    assert ak.preference_loss(*tensors[:2], method="alpha_dpo", **refs, decay=0.5, running=resumed).item() == (
        ak.preference_loss(*tensors[:2], method="alpha_dpo", **refs, decay=0.5, running=running).item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_dpo_running_statistics_match_reference(dtype):
    """decay > 0 over five batches of 1 to 9 pairs: the ops against the fp64 reference (each with its own state)
    under the testing rule, values and gradients; the conditioning taken from the state before each batch."""
    generator = torch.Generator().manual_seed(11)
    states = {"ops": ak.RunningStatistics(), "fp64": ak.RunningStatistics(), "same dtype": ak.RunningStatistics()}
    for pairs in (4, 9, 1, 2, 7):
        tensors, _ = make_inputs("alpha_dpo", pairs, generator, dtype)
        kwargs = {"method": "alpha_dpo", "beta": 10.0, "alpha": 0.3, "decay": 0.8}
        before = copy.deepcopy(states["fp64"])

        def fp64(*leaves):
            loss, grads = losses_and_grads(ref.preference_loss, leaves, torch.float64,
                                           running=copy.deepcopy(before), **kwargs)
            return [loss, *grads]

        conditioning = conditioning_floor(fp64, tensors, dtype)
        loss, grads = losses_and_grads(ak.preference_loss, tensors, dtype, running=states["ops"], **kwargs)
        loss64, grads64 = losses_and_grads(ref.preference_loss, tensors, torch.float64, running=states["fp64"],
                                           **kwargs)
        loss_same, grads_same = losses_and_grads(ref.preference_loss, tensors, dtype, running=states["same dtype"],
                                                 **kwargs)
        assert loss.dtype == dtype
        assert_within_rule(loss, loss64, loss_same, k=2, dtype=dtype, what="running alpha_dpo loss",
                           conditioning=conditioning[0])
        for grad, grad64, grad_same, floor in zip(grads, grads64, grads_same, conditioning[1:]):
            assert_within_rule(grad, grad64, grad_same, k=3, dtype=dtype, what="running alpha_dpo grad",
                               conditioning=floor)
    assert states["ops"].mean_std[1] > 0


def test_alpha_dpo_running_statistics_arguments():
    """decay in [0, 1); decay > 0 needs running= (a RunningStatistics), decay = 0 refuses one it would pass over,
    and a method without running statistics refuses the name, each before any loss runs."""
    tensors, _ = make_inputs("alpha_dpo", 4, torch.Generator().manual_seed(5), torch.float64)
    call = {"method": "alpha_dpo", "ref_chosen_logps": tensors[2], "ref_rejected_logps": tensors[3]}
    with pytest.raises(ValueError, match=r"decay=0.9 needs running=amapo_kernels.RunningStatistics\(\)"):
        ak.preference_loss(*tensors[:2], **call, decay=0.9)
    with pytest.raises(ValueError, match=r"running= is used only with decay > 0"):
        ak.preference_loss(*tensors[:2], **call, running=ak.RunningStatistics())
    with pytest.raises(TypeError, match=r"running must be an amapo_kernels.RunningStatistics, got dict"):
        ak.preference_loss(*tensors[:2], **call, decay=0.9, running={"mean": 0.0, "std": 1.0})
    for decay in (1.0, -0.1, math.nan):
        with pytest.raises(ValueError, match=r"decay must be a finite number in \[0.0, 1.0\)"):
            ak.preference_loss(*tensors[:2], **call, decay=decay, running=ak.RunningStatistics())
    with pytest.raises(TypeError, match=r"method='kto' has no hyperparameter \['running'\]"):
        ak.preference_loss(*tensors[:2], method="kto", ref_chosen_logps=tensors[2], ref_rejected_logps=tensors[3],
                           running=ak.RunningStatistics())


def test_methods_take_the_log_probs_of_their_papers():
    """Summed log-probs for dpo, ipo, slic, cpo, odpo, kto, focalpo; length-normalized for simpo, alpha_dpo, amapo
    (preference_loss's docstring): what the training driver feeds each method."""
    assert [m for m in ak.METHODS if ak.preference.uses_mean_logps(m)] == ["simpo", "alpha_dpo", "amapo"]


@pytest.mark.parametrize("method", ak.METHODS)
def test_mixed_dtypes_compute_in_the_promoted_dtype(method):
    """Log-probs of mixed dtypes compute in torch's promoted dtype whichever argument holds the float64 one (the
    policy's or the reference's): a float64 tensor is never rounded to float32 because the first is float32."""
    generator = torch.Generator().manual_seed(13)
    tensors, extra = make_inputs(method, 8, generator, torch.float64)
    names = ["chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"]
    expected = ak.preference_loss(*tensors[:2], method=method, ref_chosen_logps=tensors[2],
                                  ref_rejected_logps=tensors[3], **extra)
    for wide in range(4):
        mixed = [t if i == wide else t.float() for i, t in enumerate(tensors)]
        if method == "amapo" and wide >= 2:
            continue  # AMaPO takes no reference log-probs
        loss = ak.preference_loss(*mixed[:2], method=method, ref_chosen_logps=mixed[2], ref_rejected_logps=mixed[3],
                                  **extra)
        assert loss.dtype == torch.float64, names[wide]
        exact = ak.preference_loss(*[t.double() for t in mixed[:2]], method=method,
                                   ref_chosen_logps=mixed[2].double(), ref_rejected_logps=mixed[3].double(), **extra)
        assert torch.equal(loss, exact), names[wide]
    assert expected.dtype == torch.float64


@pytest.mark.parametrize("scores", ["float64", "int64", "int64 beyond 2**53"])
def test_odpo_score_gap_keeps_the_scores_precision(scores):
    """The offset is alpha * log(s_w - s_l) of the scores as given: the gap of 1e8 + 5 and 1e8 is 5, not the 8 of
    their float32 roundings (a silently wrong loss); int64 scores 2**40 + 3 and 2**40 are not a tie, nor are
    2**60 + 3 and 2**60, one float64 value (subtracted as integers). Expected: small scores of the same gaps."""
    chosen, rejected = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -19.0])
    refs = torch.tensor([-11.0, -19.0])
    if scores == "float64":
        s_w, s_l = torch.tensor([1e8 + 5, 3.0], dtype=torch.float64), torch.tensor([1e8, 1.0], dtype=torch.float64)
    else:
        top = 2**40 if scores == "int64" else 2**60
        s_w, s_l = torch.tensor([top + 5, 3]), torch.tensor([top, 1])
    loss = ak.preference_loss(chosen, rejected, method="odpo", ref_chosen_logps=refs, ref_rejected_logps=refs,
                              chosen_scores=s_w, rejected_scores=s_l)
    gaps = {"chosen_scores": torch.tensor([5.0, 3.0], dtype=torch.float64),
            "rejected_scores": torch.tensor([0.0, 1.0], dtype=torch.float64)}
    expected = ref.odpo(chosen.double(), rejected.double(), refs.double(), refs.double(), beta=0.1, alpha=1.0,
                        **gaps).mean()
    assert abs(loss.item() - expected.item()) < 1e-6 * abs(expected.item())
