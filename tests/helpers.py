"""The tolerance rule of the project and input generators shared by the tests."""

import socket

import torch

from amapo_kernels.testing import peaked_logits  # noqa: F401  (re-exported for the tests)

ULPS = 4  # the floor: a few units in the last place of the output dtype


def assert_within_rule(actual, fp64, same_dtype, *, k, dtype, what="value", conditioning=0.0):
    """The project's rule: max|actual - fp64| <= k * max|same_dtype - fp64| + floor, maxima over elements,
    where same_dtype is plain torch computing in the tested dtype and the floor is ULPS ulps of `dtype` at
    the scale max|fp64| plus k * `conditioning`: the error that one rounding of the inputs to their dtype
    causes in the fp64 result (conditioning_floor), which plain torch may happen to avoid while a kernel
    rounding its intermediates differently cannot. NaN or inf in `actual` always fails."""
    actual, fp64, same_dtype = (t.detach().double().cpu() for t in (actual, fp64, same_dtype))
    assert actual.shape == fp64.shape, (what, actual.shape, fp64.shape)
    assert torch.isfinite(actual).all(), f"{what}: non-finite output"
    if actual.numel() == 0:
        return
    scale = fp64.abs().max().item()
    floor = ULPS * torch.finfo(dtype).eps * max(scale, torch.finfo(dtype).tiny) + k * conditioning
    err = (actual - fp64).abs().max().item()
    torch_err = (same_dtype - fp64).abs().max().item()
    assert torch_err < float("inf"), f"{what}: torch in {dtype} is not finite here; the rule needs another input"
    assert err <= k * torch_err + floor, (
        f"{what}: max|actual - fp64| = {err:.3e} > {k} * max|torch {dtype} - fp64| ({torch_err:.3e}) "
        f"+ floor ({floor:.3e}); scale {scale:.3e}"
    )


def conditioning_floor(reference, inputs, dtype, *, seed=0):
    """How much the fp64 `reference` moves when its floating inputs move by one ulp of `dtype`: the max over
    elements of |reference(x + delta) - reference(x)| for two perturbations (every input one ulp up; one ulp
    with random signs), one float per output. `reference` maps fp64 tensors to a list of fp64 tensors; integer
    inputs and non-finite elements are passed unchanged. This is the quantity's conditioning at this input: e.g.
    AMaPO's exp margin magnifies a 1-ulp log-prob change, and a log near 1 turns it into a large relative
    change."""
    generator = torch.Generator().manual_seed(seed)
    base = [out.detach() for out in reference(*[x.detach().double() if x.is_floating_point() else x for x in inputs])]
    worst = [0.0] * len(base)
    for random_signs in (False, True):
        moved = []
        for x in inputs:
            if not x.is_floating_point():
                moved.append(x)
                continue
            low = x.detach().to(dtype)
            ulp = (torch.nextafter(low, torch.full_like(low, float("inf"))) - low).double()
            ulp = torch.where(torch.isfinite(low), ulp, 0.0)  # a -inf (a masked id) has no neighbour to move to
            sign = torch.randint(0, 2, x.shape, generator=generator).double().to(x.device) * 2 - 1 if random_signs else 1.0
            moved.append(x.detach().double() + sign * ulp)
        for i, out in enumerate(reference(*moved)):
            change = (out.detach() - base[i]).abs()
            worst[i] = max(worst[i], change.max().item() if change.numel() else 0.0)
    return worst


def logps_rounding_floors(loss_of_logps, logps64, labels, *, shift, ignore_index=-100):
    """[loss floor, logits-gradient floor] of a loss computed from the per-sequence log-probs that the from-logits
    API hands it in fp32 (its log-prob dtype, whatever the logits'): how much the fp64 loss, and each row's
    gradient coefficient (d loss / d log-prob over the row's count, times |onehot - softmax| <= 1), move when
    those log-probs move by one fp32 ulp (conditioning_floor). Each is a mean of token log-probs of size ~10 (an
    ulp of ~1e-6), and the loss sees their differences, times beta: plain torch's errors in two rows can happen
    to share a sign and cancel in the difference (seen: 9e-8 against a kernel's 1.0e-6), a kernel's equally
    small ones need not."""
    scored = (labels[:, 1:] if shift else labels) != ignore_index
    counts = scored.sum(-1).clamp(min=1).double().to(logps64.device)

    def loss_and_coefficients(logps):
        logps = logps.requires_grad_()
        loss = loss_of_logps(logps)
        (row_grads,) = torch.autograd.grad(loss, logps)
        return [loss, row_grads / counts]

    return conditioning_floor(loss_and_coefficients, [logps64.detach()], torch.float32)


def softmax_grad_floor(row_grads, labels, *, shift, average, ignore_index=-100):
    """The conditioning of a logits gradient coef * (onehot - softmax): where the label's probability is near 1
    the two terms cancel, and a kernel computing in fp32 holds that probability only to one fp32 ulp of 1, so
    its gradient may be off by |coef| * eps_fp32 however small the exact result (plain torch can happen to be
    exact there). row_grads: d output / d sequence log-prob per row; coef divides it by the row's count."""
    scored = (labels[:, 1:] if shift else labels) != ignore_index
    counts = scored.sum(-1).to(row_grads.device)
    coefs = row_grads.detach().abs().double() / (counts.clamp(min=1) if average else 1)
    coefs = torch.where(counts > 0, coefs, torch.zeros_like(coefs))
    return torch.finfo(torch.float32).eps * (coefs.max().item() if coefs.numel() else 0.0)


def random_labels(batch, steps, vocab, *, ignore_prob, generator, device="cpu", ignore_index=-100,
                  all_ignored_rows=()):
    labels = torch.randint(0, vocab, (batch, steps), generator=generator)
    ignored = torch.rand(batch, steps, generator=generator) < ignore_prob
    labels[ignored] = ignore_index
    for row in all_ignored_rows:
        labels[row] = ignore_index
    return labels.to(device)


def logits_beyond_int32(steps=3, vocab=1000, seed=9):
    """bf16 logits [2, steps, vocab] whose two sequences lie 2^31 + 2^20 elements apart in one buffer (untouched
    between them, so only a few pages are ever mapped): the second one's rows sit beyond 2^31 elements, where a
    32-bit offset wraps. Returns (logits, labels)."""
    batch_stride = 2**31 + 2**20
    storage = torch.empty(batch_stride + steps * vocab, dtype=torch.bfloat16)
    logits = storage.as_strided((2, steps, vocab), (batch_stride, vocab, 1))
    generator = torch.Generator().manual_seed(seed)
    logits.copy_(peaked_logits(2, steps, vocab, dtype=torch.bfloat16, generator=generator))
    return logits, random_labels(2, steps, vocab, ignore_prob=0.0, generator=generator)


def exact_amapo(chosen, rejected, *, beta, label_smoothing=0.0, variant="code"):
    """AMaPO's loss and d loss / d chosen_logps (d / d rejected is its negative) computed exactly from the fp64
    inputs: the gaps d_i as exact rationals, everything else in mpmath at 60 significant digits. Returns
    (loss, [grad_i]) as Python floats (each correctly rounded from the high-precision value)."""
    from fractions import Fraction

    import mpmath

    with mpmath.workdps(60):
        d = [Fraction(c) - Fraction(r) for c, r in zip(chosen.tolist(), rejected.tolist())]
        n = len(d)
        mean = sum(d) / n
        var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else Fraction(0)
        sd = mpmath.sqrt(mpmath.mpf(var.numerator) / var.denominator)
        beta_q, eps = mpmath.mpf(beta), mpmath.mpf(label_smoothing)
        loss, grads = mpmath.mpf(0), []
        for x in d:
            gap = mean - x  # exact
            margin = mpmath.mpf(0)
            if sd > 0:
                z = mpmath.mpf(gap.numerator) / gap.denominator / sd
                exponent = z * mpmath.mpf(mean.numerator) / mean.denominator * (beta_q if variant == "paper" else 1)
                gated = exponent > 0 if variant == "paper" else gap > 0
                if gated:
                    margin = beta_q * mpmath.exp(min(exponent, 50))
            logit = beta_q * mpmath.mpf(x.numerator) / x.denominator - margin
            softplus = lambda v: mpmath.log1p(mpmath.exp(v))  # noqa: E731
            loss += (1 - eps) * softplus(-logit) + eps * softplus(logit)
            sigmoid = lambda v: 1 / (1 + mpmath.exp(-v))  # noqa: E731
            grads.append(beta_q / n * (eps * sigmoid(logit) - (1 - eps) * sigmoid(-logit)))
        return float(loss / n), [float(g) for g in grads]


def small_spread_pairs(spread, pairs=6, seed=0):
    """fp64 log-probs whose gaps d = 0.3 + spread * N(0, 1) are exact differences (Sterbenz: chosen and rejected
    lie within a factor 2), so the exact computation and the kernel start from the same d."""
    generator = torch.Generator().manual_seed(seed)
    rejected = -1.75 - torch.randint(0, 4, (pairs,), generator=generator).double() / 16
    d = 0.3 + spread * torch.randn(pairs, generator=generator, dtype=torch.float64)
    chosen = rejected + d
    assert torch.equal((chosen - rejected) + rejected, chosen)
    return chosen, rejected


def free_port() -> int:
    """A TCP port free on this machine now, for a process group's MASTER_PORT."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
