"""Bad input raises a clear ValueError / TypeError naming the argument, before any kernel runs."""

import re

import pytest
import torch

import amapo_kernels as ak
from amapo_kernels._ops import ops

V = 7


def logits_labels(batch=2, steps=3, vocab=V):
    return torch.randn(batch, steps, vocab), torch.randint(0, vocab, (batch, steps))


LOGITS_CASES = [
    # (description, logits, labels, error type, message fragment)
    ("logits 2-D", torch.randn(2, V), torch.zeros(2, 3, dtype=torch.long), ValueError, "logits must have 3 dims"),
    ("labels 1-D", torch.randn(2, 3, V), torch.zeros(6, dtype=torch.long), ValueError, "labels must have 2 dims"),
    ("B mismatch", torch.randn(2, 3, V), torch.zeros(3, 3, dtype=torch.long), ValueError, "labels must be [B, T]"),
    ("T mismatch", torch.randn(2, 3, V), torch.zeros(2, 4, dtype=torch.long), ValueError, "labels must be [B, T]"),
    ("int32 labels", torch.randn(2, 3, V), torch.zeros(2, 3, dtype=torch.int32), TypeError, "labels must have dtype"),
    ("int logits", torch.zeros(2, 3, V, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.long), TypeError,
     "logits must have dtype"),
    ("empty vocabulary", torch.randn(2, 3, 0), torch.zeros(2, 3, dtype=torch.long), ValueError, "empty vocabulary"),
    ("strided vocabulary", torch.randn(2, V, 3).transpose(1, 2), torch.zeros(2, 3, dtype=torch.long), ValueError,
     "contiguous vocabulary"),
    ("label >= V", torch.randn(2, 3, V), torch.full((2, 3), V), ValueError, "labels must lie in [0, V=7)"),
    ("negative label", torch.randn(2, 3, V), torch.full((2, 3), -1), ValueError, "labels must lie in [0, V=7)"),
    ("labels on meta", torch.randn(2, 3, V), torch.zeros(2, 3, dtype=torch.long, device="meta"), ValueError,
     "one device"),
    ("logits not a tensor", [[[0.0] * V]], torch.zeros(1, 1, dtype=torch.long), TypeError, "logits must be a torch.Tensor"),
]


@pytest.mark.parametrize("case", LOGITS_CASES, ids=[case[0] for case in LOGITS_CASES])
@pytest.mark.parametrize("api", ["sequence_logps", "amapo_loss_from_logits"])
def test_logits_inputs(case, api):
    _, logits, labels, error, fragment = case
    with pytest.raises(error, match=re.escape(fragment)):
        getattr(ak, api)(logits, labels)


def test_label_out_of_range_with_shift_is_caught_in_the_scored_part():
    logits, labels = logits_labels()
    labels[:, 0] = 999  # never scored with shift=True
    ak.sequence_logps(logits, labels, shift=True)
    labels[:, 1] = 999
    with pytest.raises(ValueError, match="labels must lie"):
        ak.sequence_logps(logits, labels, shift=True)


def test_custom_ignore_index_is_not_out_of_range():
    logits, labels = logits_labels()
    labels[0, 0] = -1
    ak.sequence_logps(logits, labels, ignore_index=-1)


def test_direct_op_calls_are_guarded():
    """The C++ ops check by themselves too: a direct call never reads out of bounds."""
    logits, labels = logits_labels()
    with pytest.raises(ValueError, match="labels must lie"):
        ops.sequence_logps_fwd(logits, torch.full((2, 3), V), -100, True, False)
    with pytest.raises(ValueError, match="contiguous vocabulary"):
        ops.sequence_logps_fwd(torch.randn(2, V, 3).transpose(1, 2), labels, -100, True, False)
    _, stats = ops.sequence_logps_fwd(logits, labels, -100, True, False)
    with pytest.raises(ValueError, match="softmax_stats must be"):
        ops.sequence_logps_bwd(torch.ones(2), logits, labels, stats[:, :1], -100, True, False)
    with pytest.raises(ValueError, match="variant must be"):
        ops.amapo_loss_fwd(torch.zeros(2), torch.zeros(2), torch.zeros(3, dtype=torch.float64), 2.0, 0.0, "x", "none")
    with pytest.raises(ValueError, match="batch_sums"):
        ops.amapo_loss_fwd(torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.float64), 2.0, 0.0, "code",
                           "none")


def test_odd_batch_for_from_logits():
    logits, labels = logits_labels(batch=3)
    with pytest.raises(ValueError, match="even batch"):
        ak.amapo_loss_from_logits(logits, labels)


PAIR_CASES = [
    ("chosen 2-D", dict(chosen_logps=torch.zeros(2, 2)), ValueError, "chosen_logps must have 1 dims"),
    ("length mismatch", dict(rejected_logps=torch.zeros(3)), ValueError, "rejected_logps must have the shape"),
    ("int chosen", dict(chosen_logps=torch.zeros(2, dtype=torch.long)), TypeError, "chosen_logps must have dtype"),
    ("rejected on meta", dict(rejected_logps=torch.zeros(2, device="meta")), ValueError, "one device"),
    ("variant", dict(variant="eq9"), ValueError, "variant must be one of"),
    ("ablation", dict(ablation="no_margin"), ValueError, "ablation must be one of"),
    ("beta", dict(beta=0.0), ValueError, "beta must be a positive number"),
    ("label_smoothing", dict(label_smoothing=0.7), ValueError, "label_smoothing must be in"),
]


@pytest.mark.parametrize("case", PAIR_CASES, ids=[case[0] for case in PAIR_CASES])
def test_amapo_loss_inputs(case):
    _, overrides, error, fragment = case
    kwargs = dict(chosen_logps=torch.zeros(2), rejected_logps=torch.zeros(2), **{})
    kwargs.update(overrides)
    chosen, rejected = kwargs.pop("chosen_logps"), kwargs.pop("rejected_logps")
    with pytest.raises(error, match=re.escape(fragment)):
        ak.amapo_loss(chosen, rejected, **kwargs)


@pytest.mark.parametrize("method", ["dpo", "ipo", "odpo", "kto", "focalpo", "alpha_dpo"])
def test_reference_methods_need_reference_logps(method):
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        ak.preference_loss(torch.zeros(2), torch.zeros(2), method=method)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        ak.preference_loss(torch.zeros(2), torch.zeros(2), method=method, ref_chosen_logps=torch.zeros(2))


def test_preference_loss_arguments():
    pair = (torch.zeros(2), torch.zeros(2))
    refs = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    with pytest.raises(ValueError, match="method must be one of"):
        ak.preference_loss(*pair, method="orpo")
    with pytest.raises(TypeError, match="no hyperparameter"):
        ak.preference_loss(*pair, method="dpo", gamma=1.0, **refs)
    with pytest.raises(ValueError, match="ref_chosen_logps must have the shape"):
        ak.preference_loss(*pair, method="dpo", ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(2))
    with pytest.raises(ValueError, match="needs chosen_scores"):
        ak.preference_loss(*pair, method="odpo", **refs)
    with pytest.raises(ValueError, match="chosen_scores must exceed"):
        ak.preference_loss(*pair, method="odpo", chosen_scores=torch.zeros(2), rejected_scores=torch.ones(2), **refs)
    with pytest.raises(ValueError, match="form must be one of"):
        ak.preference_loss(*pair, method="slic", form="squared")
