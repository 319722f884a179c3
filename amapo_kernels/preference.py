"""preference_loss: every method of the AMaPO paper's Table 6 behind one call."""

import inspect

import torch

from amapo_kernels._checks import (LOGPS_DTYPES, SCORE_DTYPES, Range, _as_float, check_bool, check_choice,
                                   check_group, check_hparams, check_pair_logps, check_per_pair)
from amapo_kernels import amapo
from amapo_kernels._ops import acc_dtype
from amapo_kernels.batch_statistics import RunningStatistics
from amapo_kernels.amapo import amapo_loss
from amapo_kernels.losses import alpha_dpo, cpo, dpo, focalpo, ipo, kto, odpo, simpo, slic

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
METHODS = (*BASELINES, "amapo")


def uses_mean_logps(method: str) -> bool:
    """Whether `method` is defined on length-normalized log-probs (else summed ones)."""
    check_choice("method", method, METHODS)
    return method == "amapo" or BASELINES[method].LOGPS == "mean"


def method_defaults(method: str) -> dict:
    """The hyperparameters `method` takes, with their defaults (amapo: amapo_loss's keywords)."""
    check_choice("method", method, METHODS)
    if method != "amapo":
        return dict(BASELINES[method].DEFAULTS)
    keywords = inspect.signature(amapo_loss).parameters.values()
    return {p.name: p.default for p in keywords if p.kind is p.KEYWORD_ONLY and p.name not in ("group", "return_stats")}


def resolved_hparams(method: str, hparams: dict) -> dict:
    """`hparams` with `method`'s defaults filled in, validated before any loss runs: an unknown name is a
    TypeError listing the method's names, a value outside its rule (finite, sign, range, choices) a ValueError
    naming the method and the argument. The one check behind preference_loss, the driver and integrations."""
    defaults = method_defaults(method)
    unknown = sorted(set(hparams) - set(defaults))
    if unknown:
        raise TypeError(f"method={method!r} has no hyperparameter {unknown}; it takes {sorted(defaults)}")
    resolved = {**defaults, **hparams}
    check_hparams(method, resolved, amapo.RULES if method == "amapo" else BASELINES[method].RULES)
    return resolved


def batch_statistics_of(method: str) -> bool:
    """Whether `method`'s loss of a pair depends on statistics of the whole batch (amapo's mean and std,
    alpha_dpo's z-score, kto's reference point): those are over the pairs of every rank of its `group=`
    keyword (default: the world when torch.distributed is initialized), as the methods' trainers gather them."""
    check_choice("method", method, METHODS)
    return method == "amapo" or getattr(BASELINES[method], "BATCH_STATISTICS", False)


def statistics_pool_error(method: str, hparams: dict, batch_sizes: dict, processes: int,
                          eval_batch_sizes: dict | None = None) -> str | None:
    """Why `method` cannot train on these batches, None where it can: amapo's margin and alpha_dpo's alpha * M*
    term are z-scores over the batch, which in a trainer is one micro-batch of every process (gradient
    accumulation does not pool them). Over one pair there is no spread, every z-score is 0, and the loss would
    train without its margin (AMaPO: a margin-free SimPO) without a word. batch_sizes: {the setting as its
    trainer names it, e.g. "--per-device-batch-size 1": pairs per micro-batch and process}; eval_batch_sizes
    likewise for the held-out loss, which running statistics (alpha_dpo with decay > 0) serve at any batch size.
    The driver and the TRL trainer refuse such a batch size with this message."""
    z_scored = method == "amapo" or (method == "alpha_dpo" and {**method_defaults(method), **hparams}["alpha"] != 0)
    sizes = dict(batch_sizes)
    if not keeps_running_statistics(method, hparams):
        sizes.update(eval_batch_sizes or {})
    for setting, size in sizes.items():
        if z_scored and size * processes < 2:
            return (f"{setting} with {processes} process(es): loss={method!r} takes z-scores over the pairs of one "
                    "micro-batch of every process (gradient accumulation does not pool them), so over 1 pair, "
                    "where every z-score is 0; give it 2 pairs or more, or launch more processes")
    return None


def keeps_running_statistics(method: str, hparams: dict) -> bool:
    """Whether `method` with `hparams` z-scores with running statistics (alpha_dpo with decay > 0): its caller
    keeps a RunningStatistics from call to call (passed as running=) and checkpoints it with the run."""
    check_choice("method", method, METHODS)
    module = BASELINES.get(method)
    return getattr(module, "RUNNING_STATISTICS", False) and {**module.DEFAULTS, **hparams}["decay"] > 0


def logged_rewards(method: str, hparams: dict, logps: torch.Tensor, ref_logps: torch.Tensor | None = None):
    """The rewards a trainer logs for `method` (hparams: defaults filled in), per response, detached: beta (1 for a
    method without one) times the policy's log-prob, minus the reference's where one is given (TRL's rule); a
    method with a reward of its own defines `rewards` (alpha_dpo: that of its implicit reference). The driver and
    the TRL trainer log these."""
    logps = logps.detach()
    module = BASELINES.get(method)
    if ref_logps is not None and hasattr(module, "rewards"):
        return module.rewards(logps, ref_logps.to(logps), **hparams)
    beta = hparams.get("beta", 1.0)
    return beta * (logps - ref_logps.to(logps)) if ref_logps is not None else beta * logps


def needs_reference(method: str, hparams: dict) -> bool:
    """Whether `method` with `hparams` (defaults filled in) needs reference-model log-probs."""
    return method != "amapo" and BASELINES[method].needs_reference({**method_defaults(method), **hparams})


def check_call(method: str, pairs: int, device: torch.device, ref_chosen_logps, ref_rejected_logps,
               hparams: dict) -> dict:
    """The checks of a preference_loss call that need no policy log-probs, for `pairs` pairs on `device`: the
    method and its hyperparameters (returned with the defaults filled in; amapo's as given, for amapo_loss),
    the reference log-probs it needs and the per-pair tensors it requires. preference_loss runs them, and the
    from-hidden functions before their forward, so that a wrong argument costs no lm_head pass."""
    check_choice("method", method, METHODS)
    if method == "amapo":  # amapo_loss's keywords; group and return_stats are its own, not hyperparameters
        resolved_hparams(method, {k: v for k, v in hparams.items() if k not in ("group", "return_stats")})
        check_bool("return_stats", hparams.get("return_stats", False))
        check_group(hparams.get("group"))
        _check_references(method, pairs, device, ref_chosen_logps, ref_rejected_logps, needed=False)
        return hparams
    module = BASELINES[method]
    # group= (the ranks sharing the batch statistics) is a keyword of the methods that have some, running= (a
    # running statistics' state) of those that keep one; neither is a hyperparameter, elsewhere each is refused
    # as an unknown name
    taken = {"group": batch_statistics_of(method), "running": getattr(module, "RUNNING_STATISTICS", False)}
    keywords = {name: hparams[name] for name in taken if taken[name] and name in hparams}
    hparams = resolved_hparams(method, {name: value for name, value in hparams.items() if name not in keywords})
    check_group(keywords.get("group"))
    if taken["running"]:
        _check_running(method, hparams["decay"], keywords.get("running"))
    _check_references(method, pairs, device, ref_chosen_logps, ref_rejected_logps,
                      needed=module.needs_reference(hparams))
    for name in getattr(module, "REQUIRED", ()):
        if hparams[name] is None:
            raise ValueError(f"method={method!r} needs {name}")
        check_per_pair(name, hparams[name], pairs, device, SCORE_DTYPES)
    return {**hparams, **keywords}


def _check_running(method, decay, running) -> None:
    """decay > 0 needs the state of the running statistics, kept by the caller from call to call; a state given
    with decay = 0 (the current batch's statistics) would be passed over, and is refused."""
    if running is not None and not isinstance(running, RunningStatistics):
        raise TypeError(f"method={method!r}: running must be an amapo_kernels.RunningStatistics, "
                        f"got {type(running).__name__}")
    if decay > 0 and running is None:
        raise ValueError(f"method={method!r} with decay={decay} needs running=amapo_kernels.RunningStatistics(), "
                         "created once and passed to every call (the running mean and std it updates)")
    if decay == 0 and running is not None:
        raise ValueError(f"method={method!r}: running= is used only with decay > 0 (decay=0 takes the current "
                         "batch's statistics)")


def _check_references(method, pairs, device, ref_chosen_logps, ref_rejected_logps, *, needed: bool) -> None:
    """Reference log-probs, when given, are checked per pair, also where the method does not use them (amapo): a
    wrong shape, dtype, device or type is an error naming them, never silently passed over. A missing one is an
    error where the method `needed` it."""
    for name, value in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if value is not None:
            check_per_pair(name, value, pairs, device, LOGPS_DTYPES)
        elif needed:
            raise ValueError(f"method={method!r} needs {name} (reference-model log-probs)")


def check_float_range(method: str, hparams: dict, dtype: torch.dtype) -> None:
    """A real hyperparameter of a baseline (`hparams` resolved) must be finite in the dtype its loss computes in: a
    value beyond float32's range multiplies a float32 tensor as inf (inf * 0 = NaN where the fp64 loss is finite).
    amapo_loss computes in float64 (a float32 loss beyond float32's range is inf)."""
    if method == "amapo":
        return
    limit = torch.finfo(dtype).max
    for name, rule in BASELINES[method].RULES.items():
        if isinstance(rule, Range) and abs(_as_float(hparams[name])) > limit:
            raise ValueError(f"method={method!r}: {name} must be within {dtype}'s range, in which the loss computes "
                             f"(that of the log-probs), got {hparams[name]!r}")


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    method: str,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    **hparams,
) -> torch.Tensor:
    """Mean loss over pairs for `method`; hyperparameters default to the method's paper (README table).

    Log-probs are summed over response tokens for dpo, ipo, slic, cpo, odpo, kto, focalpo and
    length-normalized for simpo, alpha_dpo, amapo (sequence_logps(average=False / True)).
    method="amapo" takes amapo_loss's keywords (beta, label_smoothing, variant, ablation, group); alpha_dpo
    and kto take group= too (their batch statistics are over every rank of it, see batch_statistics_of);
    alpha_dpo with decay > 0 takes running= (a RunningStatistics kept from call to call; frozen() for evaluation).
    Hyperparameters are validated by one rule set per method (finite, sign, range; the error names the
    method and the argument). An empty batch (B = 0) gives a loss of 0 for every method. The loss computes in
    float64 where a log-prob tensor given is float64 (torch's promotion), in float32 otherwise.
    """
    check_choice("method", method, METHODS)
    check_pair_logps(chosen_logps, rejected_logps)
    if method == "amapo":
        _check_references(method, chosen_logps.shape[0], chosen_logps.device, ref_chosen_logps, ref_rejected_logps,
                          needed=False)
        return amapo_loss(chosen_logps, rejected_logps, **hparams)
    hparams = check_call(method, chosen_logps.shape[0], chosen_logps.device, ref_chosen_logps, ref_rejected_logps,
                         hparams)
    references = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    dtype = acc_dtype(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    check_float_range(method, hparams, dtype)
    cast = {name: value.to(dtype) if value is not None else None for name, value in references.items()}
    losses = BASELINES[method].pair_losses(
        chosen_logps.to(dtype), rejected_logps.to(dtype), cast["ref_chosen_logps"], cast["ref_rejected_logps"], **hparams
    )
    # B = 0: a loss of 0 (attached to the inputs, zero gradients) for every method, AMaPO included, not NaN
    return losses.mean() if losses.numel() else losses.sum()
