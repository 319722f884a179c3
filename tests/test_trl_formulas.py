"""Each baseline against the formula TRL 1.16 computes, written out here (not imported) from
trl/trainer/dpo_trainer.py (DPOTrainer loss types "sigmoid", "ipo", "hinge"), trl/experimental/cpo/
cpo_trainer.py (CPOTrainer "sigmoid", "simpo", "hinge" plus cpo_alpha * NLL) and trl/trainer/kto_trainer.py
(KTOTrainer "kto"). Identical fp64 inputs; the library's documented departures (README, Baselines table) are
applied to the inputs or hyperparameters, never to the result, and the two agree to 1e-12."""

import pytest
import torch
import torch.nn.functional as F

import amapo_kernels as ak

B = 6
RTOL, ATOL = 1e-12, 1e-15


def batch(seed=0):
    """Per-token policy and reference log-probs of B chosen and B rejected responses with ragged lengths, as
    TRL's concatenated forward produces them (masked tokens 0): summed log-probs, token counts, and the
    chosen tokens for the NLL terms."""
    generator = torch.Generator().manual_seed(seed)
    steps = 9
    lengths = torch.randint(3, steps + 1, (2 * B,), generator=generator)
    mask = (torch.arange(steps)[None, :] < lengths[:, None]).double()
    policy = -torch.rand(2 * B, steps, generator=generator, dtype=torch.float64) * 3 * mask
    reference = -torch.rand(2 * B, steps, generator=generator, dtype=torch.float64) * 3 * mask
    return {
        "lc": policy[:B].sum(1), "lr": policy[B:].sum(1), "rc": reference[:B].sum(1), "rr": reference[B:].sum(1),
        "len_c": mask[:B].sum(1), "len_r": mask[B:].sum(1),
        "chosen_tokens": policy[:B][mask[:B].bool()],
    }


def assert_agree(ours, trl):
    torch.testing.assert_close(ours, trl, rtol=RTOL, atol=ATOL)


def test_dpo_is_trl_sigmoid():
    x, beta = batch(1), 0.3
    chosen_logratios, rejected_logratios = x["lc"] - x["rc"], x["lr"] - x["rr"]
    trl = (-F.logsigmoid(beta * (chosen_logratios - rejected_logratios))).mean()
    ours = ak.preference_loss(x["lc"], x["lr"], method="dpo", beta=beta, ref_chosen_logps=x["rc"],
                              ref_rejected_logps=x["rr"])
    assert_agree(ours, trl)


def test_ipo_is_trl_ipo_on_length_normalized_log_ratios():
    """Departure: TRL divides each response's log-ratio by its token count; the IPO paper (and this
    library) does not. Applied by feeding length-normalized log-probs."""
    x, tau = batch(2), 0.4
    chosen_avg = (x["lc"] - x["rc"]) / x["len_c"].clamp(min=1.0)
    rejected_avg = (x["lr"] - x["rr"]) / x["len_r"].clamp(min=1.0)
    trl = ((chosen_avg - rejected_avg - 1 / (2 * tau)) ** 2).mean()
    ours = ak.preference_loss(x["lc"] / x["len_c"], x["lr"] / x["len_r"], method="ipo", tau=tau,
                              ref_chosen_logps=x["rc"] / x["len_c"], ref_rejected_logps=x["rr"] / x["len_r"])
    assert_agree(ours, trl)


def trl_nll(chosen_tokens):
    """CPOTrainer's NLL: nn.CrossEntropyLoss over the batch's chosen tokens, a token mean."""
    return -chosen_tokens.mean()


@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_cpo_is_trl_cpo_sigmoid(cpo_alpha):
    """Departure: TRL's NLL is a token mean over the batch, this library's a per-pair summed NLL:
    nll_weight = cpo_alpha * B / N_tokens gives TRL's."""
    x, beta = batch(3), 0.1
    trl = (-F.logsigmoid(beta * (x["lc"] - x["lr"]))).mean() + cpo_alpha * trl_nll(x["chosen_tokens"])
    nll_weight = cpo_alpha * B / x["chosen_tokens"].numel()
    ours = ak.preference_loss(x["lc"], x["lr"], method="cpo", beta=beta, nll_weight=nll_weight)
    assert_agree(ours, trl)


@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_slic_is_trl_cpo_hinge(cpo_alpha):
    """Departures: TRL's ref-free hinge is relu(1 - beta * (lc - lr)) = beta * relu(1/beta - (lc - lr)), and its
    NLL a token mean: TRL = beta * ours(delta = 1/beta, nll_weight = cpo_alpha * B / (beta * N_tokens))."""
    x, beta = batch(4), 0.5
    trl = torch.relu(1 - beta * (x["lc"] - x["lr"])).mean() + cpo_alpha * trl_nll(x["chosen_tokens"])
    nll_weight = cpo_alpha * B / (beta * x["chosen_tokens"].numel())
    ours = beta * ak.preference_loss(x["lc"], x["lr"], method="slic", delta=1 / beta, nll_weight=nll_weight)
    assert_agree(ours, trl)


def test_slic_hinge_form_is_trl_dpo_hinge():
    x, beta = batch(5), 0.1
    trl = torch.relu(1 - beta * ((x["lc"] - x["rc"]) - (x["lr"] - x["rr"]))).mean()
    ours = ak.preference_loss(x["lc"], x["lr"], method="slic", form="hinge", tau=beta, ref_chosen_logps=x["rc"],
                              ref_rejected_logps=x["rr"])
    assert_agree(ours, trl)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_is_trl_cpo_simpo(label_smoothing):
    """CPOTrainer(loss_type="simpo", cpo_alpha=0) on length-normalized log-probs (average_log_prob=True);
    its simpo_gamma is this library's gamma. TRL's default cpo_alpha=1.0 adds an NLL term (documented)."""
    x, beta, simpo_gamma = batch(6), 2.0, 0.5
    lc, lr = x["lc"] / x["len_c"], x["lr"] / x["len_r"]
    logits = (lc - lr) - simpo_gamma / beta
    trl = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
           - F.logsigmoid(-beta * logits) * label_smoothing).mean()
    ours = ak.preference_loss(lc, lr, method="simpo", beta=beta, gamma=simpo_gamma, label_smoothing=label_smoothing)
    assert_agree(ours, trl)


def trl_kto(lc, lr, rc, rr, *, beta, kl_chosen, kl_rejected, desirable_weight, undesirable_weight):
    """KTOTrainer.kto_loss: one loss per example (B desirable, B undesirable), then .nanmean() over all 2B.
    TRL uses one kl for both terms; kl_chosen / kl_rejected let the test apply the paired reference point."""
    chosen_losses = 1 - F.sigmoid(beta * ((lc - rc) - kl_chosen))
    rejected_losses = 1 - F.sigmoid(beta * (kl_rejected - (lr - rr)))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses.nanmean()


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.8)])
def test_kto_is_trl_kto(weights):
    """No departure in scale: the mean over the 2B examples. The reference point is the documented departure
    (TRL: a KL estimate from mismatched pairs; here: the clamped detached mean log-ratio of the other half),
    applied by handing TRL's formula the same reference points."""
    x, beta = batch(7), 0.1
    desirable_weight, undesirable_weight = weights
    rc, rr = x["rc"] - 12.0, x["rr"] - 10.0  # positive mean log-ratios: both reference points > 0
    kl_chosen = ((x["lr"] - rr).mean()).clamp(min=0)  # the chosen term's z is the rejected half's mean
    kl_rejected = ((x["lc"] - rc).mean()).clamp(min=0)
    assert kl_chosen > 0 and kl_rejected > 0
    trl = trl_kto(x["lc"], x["lr"], rc, rr, beta=beta, kl_chosen=kl_chosen, kl_rejected=kl_rejected,
                  desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    ours = ak.preference_loss(x["lc"], x["lr"], method="kto", beta=beta, desirable_weight=desirable_weight,
                              undesirable_weight=undesirable_weight, ref_chosen_logps=rc, ref_rejected_logps=rr)
    assert_agree(ours, trl)


def test_kto_issue_example():
    """The issue's numbers, where both reference points clamp to 0 and TRL's formula needs no adjustment:
    B=1, lc=-1, lr=-2, rc=-1, rr=-2 gives 0.5 (TRL and the KTO paper), not 1.0."""
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    trl = trl_kto(t(-1.0), t(-2.0), t(-1.0), t(-2.0), beta=0.1, kl_chosen=0.0, kl_rejected=0.0,
                  desirable_weight=1.0, undesirable_weight=1.0)
    ours = ak.preference_loss(t(-1.0), t(-2.0), method="kto", ref_chosen_logps=t(-1.0), ref_rejected_logps=t(-2.0))
    assert ours.item() == pytest.approx(0.5, rel=1e-15)
    assert_agree(ours, trl)


def test_kto_reference_points_clamp_at_zero():
    """Negative mean log-ratios: both reference points clamp to 0, where TRL's formula needs no adjustment (kl = 0),
    at the default beta = 0.1 of the KTO paper and TRL (the other KTO tests pass beta, and their reference points
    are >= 0, where a missing clamp would not show)."""
    x = batch(8)
    rc, rr = x["rc"] + 12.0, x["rr"] + 10.0  # negative mean log-ratios
    assert (x["lc"] - rc).mean() < 0 and (x["lr"] - rr).mean() < 0
    trl = trl_kto(x["lc"], x["lr"], rc, rr, beta=0.1, kl_chosen=0.0, kl_rejected=0.0, desirable_weight=1.0,
                  undesirable_weight=1.0)
    ours = ak.preference_loss(x["lc"], x["lr"], method="kto", ref_chosen_logps=rc, ref_rejected_logps=rr)
    assert_agree(ours, trl)
