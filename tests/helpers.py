"""The tolerance rule of the project and input generators shared by the tests."""

import torch

from amapo_kernels.testing import peaked_logits  # noqa: F401  (re-exported for the tests)

ULPS = 4  # the floor: a few units in the last place of the output dtype


def assert_within_rule(actual, fp64, same_dtype, *, k, dtype, what="value"):
    """The project's rule: max|actual - fp64| <= k * max|same_dtype - fp64| + floor, maxima over elements,
    where same_dtype is plain torch computing in the tested dtype and floor = ULPS ulps of `dtype` at
    the scale max|fp64|. NaN or inf in `actual` always fails."""
    actual, fp64, same_dtype = (t.detach().double().cpu() for t in (actual, fp64, same_dtype))
    assert actual.shape == fp64.shape, (what, actual.shape, fp64.shape)
    assert torch.isfinite(actual).all(), f"{what}: non-finite output"
    if actual.numel() == 0:
        return
    scale = fp64.abs().max().item()
    floor = ULPS * torch.finfo(dtype).eps * max(scale, torch.finfo(dtype).tiny)
    err = (actual - fp64).abs().max().item()
    torch_err = (same_dtype - fp64).abs().max().item()
    assert torch_err < float("inf"), f"{what}: torch in {dtype} is not finite here; the rule needs another input"
    assert err <= k * torch_err + floor, (
        f"{what}: max|actual - fp64| = {err:.3e} > {k} * max|torch {dtype} - fp64| ({torch_err:.3e}) "
        f"+ floor ({floor:.3e}); scale {scale:.3e}"
    )


def random_labels(batch, steps, vocab, *, ignore_prob, generator, device="cpu", ignore_index=-100,
                  all_ignored_rows=()):
    labels = torch.randint(0, vocab, (batch, steps), generator=generator)
    ignored = torch.rand(batch, steps, generator=generator) < ignore_prob
    labels[ignored] = ignore_index
    for row in all_ignored_rows:
        labels[row] = ignore_index
    return labels.to(device)
