"""Ranking accuracy of a causal LM on preference pairs (AMaPO paper, Eq. 4).

A pair (x, y_w, y_l) is ranked correctly when the policy gives the chosen response a higher
log-probability than the rejected one: ``I[pi(y_w|x) > pi(y_l|x)]``. Eq. 4 compares the sequence
probabilities themselves, i.e. the *summed* response log-probs; the length-normalized variant
(``log pi(y|x) / |y|``, the implicit reward of SimPO and AMaPO) is reported beside it. A tie counts
as wrong (strict ``>``, as in RM-Bench's ``compute_accuracy``).

Data. Records, their texts, tokenization and truncation, the dataset and the batch format are those of
the training driver, ``amapo_train.data`` (``PreferenceDataset``, ``collate``; the batch contract is
documented there), so a policy is scored on exactly the tokens it was trained on, given the settings it
was trained with (``amapo-eval rank`` reads them from the checkpoint's training config); the statistics
are computed in dataset order, whatever the batching. ``pair_logps`` takes
any batch with the six ``BATCH_KEYS`` tensors, right-padded, chosen and rejected of the same or of
different lengths; any other key (``index``) is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

import amapo_kernels
from amapo_train.data import BATCH_KEYS, IGNORE_INDEX, collate

__all__ = ["BATCH_KEYS", "collate", "evaluate_ranking", "make_batches", "pair_logps", "ranking_accuracy"]

# The resampled accuracies are held at once, 8 bytes each (128 MiB here; 2**32 of them took 32 GiB and the
# machine's memory, after every pair had been scored).
MAX_RESAMPLES = 2**24


# --------------------------------------------------------------------------------------------------
# log-probs and accuracy
# --------------------------------------------------------------------------------------------------


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def _pad_right(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    if t.shape[1] == length:
        return t
    return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)


@torch.no_grad()
def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Response log-probs of every pair in ``batch`` (format in the module docstring).

    Runs one forward pass over chosen and rejected rows together (both right-padded to the longer
    length; right padding does not change the logits of real positions of a causal LM).
    Returns ``(chosen_sum, rejected_sum, chosen_mean, rejected_mean)``, each ``[B]`` float32 on the CPU:
    summed and length-normalized log-probs (``amapo_kernels.sequence_logps``; a response with no
    scored token gets 0).
    """
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing}; expected keys {list(BATCH_KEYS)}")
    n = batch["chosen_input_ids"].shape[0]
    if batch["rejected_input_ids"].shape[0] != n:
        raise ValueError("chosen and rejected rows differ in number")
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    device = _model_device(model)

    def both(key, pad):
        rows = [_pad_right(batch[f"{side}_{key}"].long(), length, pad) for side in ("chosen", "rejected")]
        return torch.cat(rows, 0).to(device)

    input_ids = both("input_ids", 0)  # the pad id is irrelevant: masked, and right of every real token
    attention_mask = both("attention_mask", 0)
    labels = both("labels", IGNORE_INDEX)
    # no key/value cache: it would hold every layer's keys and values until the logits are done
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        logits = logits.float()
    sums = amapo_kernels.sequence_logps(logits, labels, shift=True, average=False).float().cpu()
    means = amapo_kernels.sequence_logps(logits, labels, shift=True, average=True).float().cpu()
    return sums[:n], sums[n:], means[:n], means[n:]


def ranking_accuracy(
    correct: torch.Tensor, *, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict:
    """Accuracy of a boolean vector with a percentile-bootstrap interval.

    ``n_boot`` resamples of the pairs with replacement (``torch.Generator`` seeded with ``seed``, so
    the interval is deterministic); the interval is the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles of the resampled accuracies (linear interpolation,
    ``torch.quantile``). All pairs right (or all wrong) gives the degenerate interval [1, 1] ([0, 0]).
    Returns ``{"accuracy", "ci_low", "ci_high", "n"}`` as Python floats (``n`` int).
    """
    correct = torch.as_tensor(correct).reshape(-1).to(torch.float64).cpu()
    n = correct.numel()
    if n == 0:
        raise ValueError("ranking_accuracy needs at least one pair")
    if not 1 <= n_boot <= MAX_RESAMPLES:
        raise ValueError(f"n_boot must be in [1, {MAX_RESAMPLES}], got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    gen = torch.Generator().manual_seed(int(seed))
    chunk = max(1, min(n_boot, 4_000_000 // n))  # bound the index matrix to ~32 MB
    boots = []
    done = 0
    while done < n_boot:
        rows = min(chunk, n_boot - done)
        idx = torch.randint(0, n, (rows, n), generator=gen)
        boots.append(correct[idx].mean(1))
        done += rows
    boots = torch.cat(boots)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = torch.quantile(boots, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
    return {"accuracy": correct.mean().item(), "ci_low": lo, "ci_high": hi, "n": n}


class NonFiniteScores(ValueError):
    """Some pair scored a NaN or infinite log-prob: the model's outputs are not finite there (its weights, or an
    overflow of float16). Ranked, such a pair counted as wrong (NaN > x is false), and a broken model read as
    an accuracy of 0 with a zero-width interval."""


def evaluate_ranking(
    model,
    batches: Iterable[dict],
    progress: bool = True,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    return_logps: bool = False,
    gather=None,
) -> dict:
    """Ranking accuracy of ``model`` over ``batches`` (each in the format of the module docstring).

    Returns ``{"n_pairs", "summed": {...}, "normalized": {...}, "n_boot", "seed", "confidence"}``,
    where ``summed`` (Eq. 4 as printed: summed log-probs) and ``normalized`` (length-normalized) each
    hold ``ranking_accuracy``'s dict plus ``ties`` and ``mean_margin`` (mean chosen - rejected).
    ``return_logps=True`` adds ``"logps"``: per-pair lists ``chosen_sum``, ``rejected_sum``,
    ``chosen_mean``, ``rejected_mean`` in batch order, or, when the batches carry an ``index``
    (``make_batches``' record index, to map rows back to the input), in index order with ``index`` beside
    them; the statistics are computed in that same order, so they do not depend on the batching. The model is put in eval mode and restored.
    ``gather(tensors) -> tensors``: under data parallelism, collects every process's rows of a batch
    (e.g. ``accelerator.gather_for_metrics``), so that each process scores its shard and all report on
    every pair. A NaN or infinite log-prob raises NonFiniteScores.
    """
    from tqdm.auto import tqdm

    was_training = getattr(model, "training", False)
    model.eval()
    parts = {"chosen_sum": [], "rejected_sum": [], "chosen_mean": [], "rejected_mean": []}
    indices = []
    try:
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, total=total, desc="ranking", unit="batch", disable=not progress):
            values = pair_logps(model, batch)
            if "index" in batch:
                values = (*values, batch["index"].reshape(-1))
            if gather is not None:  # data-parallel evaluation: every process's pairs, in order
                values = [value.cpu() for value in gather(values)]
            for key, value in zip(parts, values):
                parts[key].append(value)
            if "index" in batch:
                indices.append(values[-1].cpu())
    finally:
        if was_training:
            model.train()
    if not parts["chosen_sum"]:
        raise ValueError("evaluate_ranking got no batches")
    cat = {k: torch.cat(v) for k, v in parts.items()}
    if len(indices) == len(parts["chosen_sum"]):
        # Pairs in index (dataset) order, whatever the batching: the bootstrap draws positions, so its interval
        # (and the float sum of the mean margin) would otherwise depend on the batch order; make_batches
        # sorts by length, the trainer's held-out loader does not, and the two must agree.
        cat["index"] = torch.cat(indices)
        order = torch.argsort(cat["index"], stable=True)
        cat = {k: v[order] for k, v in cat.items()}
    result = {"n_pairs": int(cat["chosen_sum"].numel())}
    finite = torch.stack([torch.isfinite(cat[key]) for key in parts]).all(0)
    if not finite.all():
        raise NonFiniteScores(f"{int((~finite).sum())} of {result['n_pairs']} pairs scored a non-finite log-prob "
                              "(NaN or inf): the model's outputs are not finite there")
    for name, suffix in (("summed", "sum"), ("normalized", "mean")):
        chosen, rejected = cat[f"chosen_{suffix}"], cat[f"rejected_{suffix}"]
        stats = ranking_accuracy(chosen > rejected, n_boot=n_boot, seed=seed, confidence=confidence)
        stats["ties"] = int((chosen == rejected).sum())
        stats["mean_margin"] = (chosen.double() - rejected.double()).mean().item()
        result[name] = stats
    result.update(n_boot=n_boot, seed=seed, confidence=confidence)
    if return_logps:
        result["logps"] = {k: v.tolist() for k, v in cat.items()}
    return result


# --------------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------------


def make_batches(pairs: Sequence[dict], batch_size: int, pad_token_id: int | None, *, sort_by_length: bool = True):
    """Batches (``amapo_train.data.collate``) of ``batch_size`` pairs; ``sort_by_length`` groups pairs of
    similar length (longest first, so an out-of-memory error shows up at once) to cut padding. Accuracy
    does not depend on the order; ``index`` in each batch maps rows back to the input records (a
    ``PreferenceDataset``'s ``record_index``, which skips dropped records; else the pair's position)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    record_index = getattr(pairs, "record_index", None) or range(len(pairs))
    items = [{**pairs[i], "index": record_index[i]} for i in range(len(pairs))]
    order = list(range(len(items)))
    if sort_by_length:
        order.sort(key=lambda i: -max(len(items[i]["chosen_input_ids"]), len(items[i]["rejected_input_ids"])))
    return [collate([items[i] for i in order[s : s + batch_size]], pad_token_id) for s in range(0, len(order), batch_size)]
