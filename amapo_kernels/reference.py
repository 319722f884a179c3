"""Readable pure-PyTorch reference of every loss, in the dtype of its inputs (float64 for the tests).

Written from the papers' formulas, independently of the ops and of amapo_kernels.losses, which the
tests compare against it. Not fused, not fast: log_softmax materializes [B, T, V]."""


import torch

MAX_MARGIN_EXPONENT = 50.0


def _sigmoid_loss(x):
    """-log(sigmoid(x)) = log(1 + exp(-x)), without overflow, and with its exact derivative -sigmoid(-x)
    everywhere: the overflow-safe max(-x, 0) + log1p(exp(-|x|)) has the right values, but autograd gives it
    the derivative 0 at x = 0 (the kinks of clamp and abs), where the true one is -1/2."""
    return -torch.nn.functional.logsigmoid(x)


def _smoothed_sigmoid_loss(x, label_smoothing):
    """Conservative (cDPO) label smoothing of _sigmoid_loss: the label flipped with probability
    label_smoothing."""
    return (1 - label_smoothing) * _sigmoid_loss(x) + label_smoothing * _sigmoid_loss(-x)


# ---------------------------------------------------------------------------------------------
# Sequence log-probabilities
# ---------------------------------------------------------------------------------------------


def sequence_logps(logits, labels, *, ignore_index=-100, average=True, shift=False):
    """sum_t log_softmax(logits[b, t])[labels[b, t]] over non-ignored t, divided by the count if average
    (0 for a row with no labels). shift pairs logits[:, t] with labels[:, t + 1]."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    # ignored positions are never read: their rows (NaN or all -inf there would poison a masked product) are 0
    logits = torch.where(mask.unsqueeze(-1), logits, torch.zeros_like(logits))
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    sums = torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(-1)
    if not average:
        return sums
    counts = mask.sum(-1)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))


# ---------------------------------------------------------------------------------------------
# AMaPO, in the paper's terms: reward r = beta * d, its batch mean mu_r and std sigma_r
# ---------------------------------------------------------------------------------------------


def batch_mean_std(d):
    """Mean and unbiased std of d; std = 0 for one pair or when every d is equal."""
    n = d.numel()
    mean = d.mean()
    if n < 2 or bool((d == d[0]).all()):
        return mean, torch.zeros_like(mean)
    return mean, torch.sqrt(((d - mean) ** 2).sum() / (n - 1))


def amapo_margin(chosen_logps, rejected_logps, *, beta=2.0, variant="code", ablation=None):
    """The detached adaptive margin h_i of each pair (see amapo_kernels.amapo for the definitions)."""
    d = (chosen_logps - rejected_logps).detach()
    if variant == "paper":
        reward = beta * d  # Eq. 9-10 on the reward itself
        mu, sigma = batch_mean_std(reward)
        raw_gap = mu - reward
    else:  # the released code: statistics of d, exponent z * mu
        mu, sigma = batch_mean_std(d)
        raw_gap = mu - d
    if sigma == 0:
        return torch.zeros_like(d)
    z = raw_gap / sigma
    gamma = (raw_gap if ablation == "no_znorm" else z) * mu
    if variant == "paper":
        gamma = gamma.clamp(min=0)  # Eq. 9: gamma = max(., 0) (kept by no_zero, which removes only h(0) = 0)
        # Eq. 10 gates on gamma > 0; no_adaptive is Eq. 8, whose gate is r < mu_r whatever the sign of mu_r
        incorrect = raw_gap > 0 if ablation == "no_adaptive" else gamma > 0
    else:
        incorrect = d < mu
    if ablation == "no_zero":
        incorrect = torch.ones_like(incorrect)
    if ablation == "no_exp":
        scaled = beta * gamma
    elif ablation == "no_adaptive":
        scaled = (mu if variant == "paper" else beta * mu).expand_as(d)
    else:
        scaled = beta * torch.exp(gamma.clamp(max=MAX_MARGIN_EXPONENT))
    return torch.where(incorrect, scaled, torch.zeros_like(scaled))


def amapo_loss(chosen_logps, rejected_logps, *, beta=2.0, label_smoothing=0.0, variant="code", ablation=None):
    margin = amapo_margin(chosen_logps, rejected_logps, beta=beta, variant=variant, ablation=ablation)
    x = beta * (chosen_logps - rejected_logps) - margin
    return _smoothed_sigmoid_loss(x, label_smoothing).mean()


def amapo_loss_from_logits(logits, labels, *, beta=2.0, ignore_index=-100, label_smoothing=0.0, shift=False,
                           variant="code", ablation=None):
    logps = sequence_logps(logits, labels, ignore_index=ignore_index, average=True, shift=shift)
    half = logps.shape[0] // 2
    return amapo_loss(logps[:half], logps[half:], beta=beta, label_smoothing=label_smoothing, variant=variant,
                      ablation=ablation)


# ---------------------------------------------------------------------------------------------
# Baselines (per-pair losses; preference_loss takes their mean). lc, lr: policy log-probs of the
# chosen / rejected response; rc, rr: reference log-probs; h = (lc - rc) - (lr - rr).
# ---------------------------------------------------------------------------------------------


def dpo(lc, lr, rc, rr, *, beta=0.1, label_smoothing=0.0):
    x = beta * ((lc - rc) - (lr - rr))
    return _smoothed_sigmoid_loss(x, label_smoothing)


def ipo(lc, lr, rc, rr, *, tau=0.1):
    h = (lc - rc) - (lr - rr)
    return (h - 1 / (2 * tau)) * (h - 1 / (2 * tau))


def slic(lc, lr, rc, rr, *, delta=1.0, nll_weight=0.1, form="rank", tau=1.0):
    if form == "hinge":
        h = (lc - rc) - (lr - rr)
        return torch.clamp(1 - tau * h, min=0)
    return torch.clamp(delta - lc + lr, min=0) + nll_weight * (-lc)


def cpo(lc, lr, rc, rr, *, beta=0.1, nll_weight=1.0):
    return _sigmoid_loss(beta * (lc - lr)) + nll_weight * (-lc)


def odpo(lc, lr, rc, rr, *, beta=0.1, alpha=1.0, chosen_scores=None, rejected_scores=None):
    delta_r = alpha * torch.log(chosen_scores.double() - rejected_scores.double()).to(lc.dtype)
    return _sigmoid_loss(beta * ((lc - rc) - (lr - rr)) - delta_r)


def kto(lc, lr, rc, rr, *, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    z_from_chosen = torch.clamp((lc - rc).detach().mean(), min=0)
    z_from_rejected = torch.clamp((lr - rr).detach().mean(), min=0)
    # 1 - sigmoid(x) written as sigmoid(-x): the subtraction would cancel to 0 in the tail
    desirable = desirable_weight * torch.sigmoid(-beta * ((lc - rc) - z_from_rejected))
    undesirable = undesirable_weight * torch.sigmoid(-beta * (z_from_chosen - (lr - rr)))
    return (desirable + undesirable) / 2  # the batch loss is the mean over the 2B examples


def simpo(lc, lr, rc, rr, *, beta=2.0, gamma=1.0, label_smoothing=0.0):
    x = beta * lc - beta * lr - gamma
    return _smoothed_sigmoid_loss(x, label_smoothing)


def focalpo(lc, lr, rc, rr, *, beta=0.1, gamma=0.05):
    x = beta * ((lc - rc) - (lr - rr))
    # p = sigmoid(x), log p as logsigmoid(x): log(sigmoid(x)) loses its digits once sigmoid(x) rounds near 1
    return -(torch.sigmoid(x) ** gamma) * torch.nn.functional.logsigmoid(x)


def alpha_dpo(lc, lr, rc, rr, *, beta=2.5, gamma=1.5, alpha=0.2, decay=0.0, label_smoothing=0.0, running=None):
    u = lc - lr
    m = (u - (rc - rr)).detach()
    if decay > 0:  # running (decayed) mean and std, updated by batches of 2+ pairs unless frozen
        if running.updating and m.numel() > 1:
            running.mean_std = decay * running.mean_std + (1 - decay) * torch.stack([m.mean(), m.std()]).double()
        mean, std = running.mean_std.tolist()
        m_star = (m - mean) / std if std != 0 else torch.zeros_like(m)
    elif m.numel() > 1 and not bool((m == m[0]).all()):  # spread (a NaN in m is spread: M* is NaN)
        m_star = (m - m.mean()) / m.std()
    else:
        m_star = torch.zeros_like(m)
    x = beta * (u - (gamma / beta + alpha * m_star))
    return _smoothed_sigmoid_loss(x, label_smoothing)


BASELINES = {
    "dpo": dpo,
    "ipo": ipo,
    "slic": slic,
    "cpo": cpo,
    "odpo": odpo,
    "kto": kto,
    "simpo": simpo,
    "focalpo": focalpo,
    "alpha_dpo": alpha_dpo,
}


def preference_loss(chosen_logps, rejected_logps, *, method, ref_chosen_logps=None, ref_rejected_logps=None,
                    **hparams):
    if method == "amapo":
        return amapo_loss(chosen_logps, rejected_logps, **hparams)
    return BASELINES[method](chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, **hparams).mean()


__all__ = ["sequence_logps", "amapo_margin", "amapo_loss", "amapo_loss_from_logits", "preference_loss"]
