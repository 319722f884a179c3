"""Bad input raises a clear ValueError / TypeError naming the argument, before any kernel runs."""

import re

import numpy as np

import pytest
import torch

import amapo_kernels as ak
from amapo_kernels import reference as ref
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
    ("label >= V", torch.randn(2, 3, V), torch.full((2, 3), V), ValueError,
     "labels must lie in [0, V=7) or equal ignore_index=-100, got labels from 7 to 7"),
    ("negative label", torch.randn(2, 3, V), torch.full((2, 3), -1), ValueError, "labels must lie in [0, V=7)"),
    ("label between ignore_index and 0", torch.randn(2, 3, V), torch.tensor([[-100, -5, 2], [0, -100, 6]]),
     ValueError, "got labels from -5 to 6"),
    ("labels on meta", torch.randn(2, 3, V), torch.zeros(2, 3, dtype=torch.long, device="meta"), ValueError,
     "one device"),
    ("logits not a tensor", [[[0.0] * V]], torch.zeros(1, 1, dtype=torch.long), TypeError, "logits must be a torch.Tensor"),
    ("sparse logits", torch.randn(2, 3, V).to_sparse(), torch.zeros(2, 3, dtype=torch.long), TypeError,
     "logits must be a dense (strided) tensor, got layout torch.sparse_coo"),
    ("sparse labels", torch.randn(2, 3, V), torch.zeros(2, 3, dtype=torch.long).to_sparse(), TypeError,
     "labels must be a dense (strided) tensor, got layout torch.sparse_coo"),
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


@pytest.mark.parametrize("api", ["sequence_logps", "amapo_loss_from_logits"])
def test_check_labels_false_still_checks_on_the_cpu(api):
    """check_labels=False removes a host sync on CUDA; on the CPU the check costs none and always runs."""
    logits, labels = logits_labels()
    labels[1, 2] = V
    with pytest.raises(ValueError, match=re.escape("labels must lie in [0, V=7)")):
        getattr(ak, api)(logits, labels, check_labels=False)
    with pytest.raises(TypeError, match="check_labels must be True or False, got 'false'"):
        ak.sequence_logps(logits, labels, check_labels="false")


SWITCHES = [  # (function, its switch): each given a truthy string, which bool() would read as True
    ("sequence_logps", "average"), ("sequence_logps", "shift"), ("sequence_logps", "inplace_backward"),
    ("sequence_logps", "check_labels"), ("amapo_loss_from_logits", "shift"),
    ("amapo_loss_from_logits", "inplace_backward"), ("amapo_loss_from_logits", "return_stats"),
    ("sequence_logps_from_hidden", "average"), ("sequence_logps_from_hidden", "shift"),
    ("sequence_logps_from_hidden", "gradient_filter"), ("amapo_loss_from_hidden", "shift"),
    ("amapo_loss_from_hidden", "return_stats"), ("amapo_loss", "return_stats"), ("AMaPOLoss", "shift"),
    ("AMaPOLoss", "inplace_backward"), ("AMaPOLoss", "check_labels"),
]


@pytest.mark.parametrize("api, switch", SWITCHES, ids=[f"{api}-{switch}" for api, switch in SWITCHES])
def test_switches_take_only_true_or_false(api, switch):
    """shift="False" would silently shift (a non-empty string is truthy): a TypeError names the switch."""
    logits, labels = logits_labels()
    hidden, weight = torch.randn(2, 3, 4), torch.randn(V, 4)
    inputs = {"sequence_logps": (logits, labels), "amapo_loss_from_logits": (logits, labels),
              "sequence_logps_from_hidden": (hidden, weight, labels), "amapo_loss_from_hidden": (hidden, weight, labels),
              "amapo_loss": (torch.randn(2), torch.randn(2)), "AMaPOLoss": ()}[api]
    with pytest.raises(TypeError, match=re.escape(f"{switch} must be True or False, got 'False'")):
        getattr(ak, api)(*inputs, **{switch: "False"})


@pytest.mark.parametrize("ignore_index", [-1, 3, V + 5])
def test_custom_ignore_index_is_not_out_of_range(ignore_index):
    """ignore_index below, inside or above [0, V): only the labels that are not it are range-checked."""
    logits, labels = logits_labels()
    labels[0, 0] = ignore_index
    ak.sequence_logps(logits, labels, ignore_index=ignore_index)
    labels[1, 1] = V
    with pytest.raises(ValueError, match=re.escape(f"ignore_index={ignore_index}, got labels from")):
        ak.sequence_logps(logits, labels, ignore_index=ignore_index)


def test_direct_op_calls_are_guarded(device):
    """The C++ ops (the CUDA ones too: emulated-cuda runs their host code) check by themselves: a direct call never
    reads out of bounds."""
    logits, labels = (x.to(device) for x in logits_labels())
    with pytest.raises(ValueError, match="labels must lie"):
        ops.sequence_logps_fwd(logits, torch.full((2, 3), V, device=device), -100, True, False)
    with pytest.raises(ValueError, match="contiguous vocabulary"):
        ops.sequence_logps_fwd(torch.randn(2, V, 3, device=device).transpose(1, 2), labels, -100, True, False)
    _, stats = ops.sequence_logps_fwd(logits, labels, -100, True, False)
    with pytest.raises(ValueError, match="softmax_stats must be"):
        ops.sequence_logps_bwd(torch.ones(2, device=device), logits, labels, stats[:, :1], -100, True, False)
    pairs, moments = torch.zeros(2, device=device), torch.zeros(4, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="variant must be"):
        ops.amapo_loss_fwd(pairs, pairs, moments, 2.0, 0.0, "x", "none")
    with pytest.raises(ValueError, match="batch_moments"):
        ops.amapo_loss_fwd(pairs, pairs, moments[:3], 2.0, 0.0, "code", "none")


def direct_backward_inputs(device, bad_label):
    """(logits, good labels, the same with one scored label replaced by bad_label, softmax_stats)."""
    logits, labels = (x.to(device) for x in logits_labels())
    labels[1, 2] = 3
    bad = labels.clone()
    bad[1, 2] = bad_label
    return logits, labels, bad, ops.sequence_logps_fwd(logits, labels, -100, True, False)[1]


@pytest.mark.parametrize("bad_label", [V, -5, 2**40])
def test_direct_backward_refuses_a_label_out_of_range_on_the_cpu(bad_label):
    """The CPU backward ops check the labels as the forward does (before: the row kernels wrote the label's
    gradient out of bounds, a segfault or heap corruption; ATen's path failed midway, naming nothing)."""
    logits, _, bad, stats = direct_backward_inputs("cpu", bad_label)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, V=7\)"):
        ops.sequence_logps_bwd(torch.ones(2), logits, bad, stats, -100, True, False)
    work = logits.clone()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, V=7\)"):
        ops.sequence_logps_bwd_inplace(torch.ones(2), work, bad, stats, -100, True, False)
    assert torch.equal(work, logits)  # refused before anything was written


@pytest.mark.parametrize("bad_label", [V, -5])
def test_direct_backward_gives_nan_rows_for_a_label_out_of_range_on_cuda(cuda_device, bad_label):
    """The CUDA backward does not check on the host (a sync per call): the row of a label out of range is NaN,
    as its log-prob is with check_labels=False, and every other row is the gradient of the valid labels
    (before: the label's term was dropped silently)."""
    logits, labels, bad, stats = direct_backward_inputs(cuda_device, bad_label)
    grad = ops.sequence_logps_bwd(torch.ones(2, device=cuda_device), logits, bad, stats, -100, True, False)
    expected = ops.sequence_logps_bwd(torch.ones(2, device=cuda_device), logits, labels, stats, -100, True, False)
    assert torch.isnan(grad[1, 2]).all()
    others = torch.ones(grad.shape[:2], dtype=torch.bool, device=grad.device)
    others[1, 2] = False
    assert torch.equal(grad[others], expected[others])


def test_direct_inplace_backward_is_an_inplace_op(device):
    """A direct call of the in-place backward refuses logits whose elements share memory (the writes collide:
    silent garbage before) and, with grad mode on, a leaf that requires grad; and it bumps the logits'
    version, so that a graph that saved them raises instead of computing with the gradient in their place."""
    logits, labels, _, stats = direct_backward_inputs(device, 0)
    ones = torch.ones(2, device=device)
    shared = logits[:, :1].expand(-1, 3, -1)
    with pytest.raises(ValueError, match="logits must not have elements that share memory"):
        ops.sequence_logps_bwd_inplace(ones, shared.clone().as_strided(shared.shape, shared.stride()), labels,
                                       stats, -100, True, False)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
        ops.sequence_logps_bwd_inplace(ones, logits.clone().requires_grad_(), labels, stats, -100, True, False)
    scale = torch.ones(V, device=device, requires_grad=True)
    scaled = logits * scale
    saved = (scaled * scaled).sum()  # saves `scaled` for its backward
    version = scaled._version
    ops.sequence_logps_bwd_inplace(ones, scaled, labels, stats, -100, True, False)
    assert scaled._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


def test_direct_op_calls_mixing_meta_and_real_tensors_are_refused():
    """A meta tensor among real ones sends a call to the fake kernels: they refuse the mix as a real op does
    (before: empty, unwritten tensors returned on the CPU)."""
    logits, labels = logits_labels()
    with pytest.raises(RuntimeError, match="expected all tensors on one device"):
        ops.sequence_logps_fwd(logits, labels.to("meta"), -100, True, False)
    pairs = torch.zeros(2)
    with pytest.raises(RuntimeError, match="expected all tensors on one device"):
        ops.amapo_loss_fwd(pairs, pairs, torch.zeros(4, dtype=torch.float64, device="meta"), 2.0, 0.0, "code", "none")


def test_direct_amapo_backward_checks_dtypes(device):
    pairs = torch.zeros(2, device=device)
    with pytest.raises(TypeError, match="rejected_logps must have chosen_logps' dtype"):
        ops.amapo_loss_bwd(torch.ones((), device=device), pairs, pairs.double(), pairs, 2.0, 0.0)
    with pytest.raises(TypeError, match="chosen_logps must be float32 or float64"):
        ops.amapo_loss_bwd(torch.ones((), device=device), pairs.half(), pairs.half(), pairs, 2.0, 0.0)
    grads = ops.amapo_loss_bwd(torch.ones((), device=device), pairs, pairs, pairs, 2.0, 0.0)  # and a valid call runs
    assert all(torch.isfinite(grad).all() for grad in grads)


@pytest.mark.parametrize("batch", [1, 3])
def test_odd_batch_for_from_logits(batch):
    logits, labels = logits_labels(batch=batch)
    with pytest.raises(ValueError, match="even batch"):
        ak.amapo_loss_from_logits(logits, labels)


PAIR_CASES = [
    ("chosen 2-D", dict(chosen_logps=torch.zeros(2, 2)), ValueError, "chosen_logps must have 1 dims"),
    ("length mismatch", dict(rejected_logps=torch.zeros(3)), ValueError, "rejected_logps must have the shape"),
    ("int chosen", dict(chosen_logps=torch.zeros(2, dtype=torch.long)), TypeError, "chosen_logps must have dtype"),
    ("rejected on meta", dict(rejected_logps=torch.zeros(2, device="meta")), ValueError, "one device"),
    ("variant", dict(variant="eq9"), ValueError, "variant must be one of"),
    ("ablation", dict(ablation="no_margin"), ValueError, "ablation must be one of"),
    ("beta", dict(beta=0.0), ValueError, "method='amapo': beta must be a finite number in (0.0, inf)"),
    ("label_smoothing", dict(label_smoothing=0.7), ValueError,
     "method='amapo': label_smoothing must be a finite number in [0.0, 0.5]"),
    ("sparse chosen", dict(chosen_logps=torch.zeros(2).to_sparse()), TypeError,
     "chosen_logps must be a dense (strided) tensor"),
    ("nested rejected", dict(rejected_logps=torch.nested.nested_tensor([torch.zeros(2)], layout=torch.jagged)),
     TypeError, "rejected_logps must be a dense (strided) tensor, got a nested tensor"),
    ("group", dict(group="world"), TypeError, "group must be None or a torch.distributed ProcessGroup, got str"),
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


def test_odpo_scores_are_real_tensors_on_the_log_probs_device():
    """ODPO's scores are checked as the reference log-probs are (before: another device failed inside torch,
    naming nothing, and complex scores passed with a cast warning)."""
    pair = (torch.zeros(2), torch.zeros(2))
    refs = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    with pytest.raises(ValueError, match="tensors must be on one device: chosen_scores on meta, the log-probs on cpu"):
        ak.preference_loss(*pair, method="odpo", chosen_scores=torch.ones(2, device="meta"),
                           rejected_scores=torch.zeros(2), **refs)
    with pytest.raises(TypeError, match="rejected_scores must have dtype in .*, got torch.complex64"):
        ak.preference_loss(*pair, method="odpo", chosen_scores=torch.ones(2),
                           rejected_scores=torch.zeros(2, dtype=torch.complex64), **refs)
    loss = ak.preference_loss(*pair, method="odpo", chosen_scores=torch.full((2,), 3), rejected_scores=torch.ones(2,
                              dtype=torch.int32), **refs)  # integer scores (ratings) are real numbers
    assert torch.isfinite(loss)


BEFORE_THE_FORWARD = {  # a wrong argument of each loss from hidden states or logits, and its error
    "beta": (dict(method="simpo", beta=-1.0), ValueError, "method='simpo': beta must be"),
    "unknown hyperparameter": (dict(method="dpo", gama=1.0), TypeError, "method='dpo' has no hyperparameter"),
    "missing reference": (dict(method="dpo"), ValueError, "method='dpo' needs ref_chosen_logps"),
    "reference shape": (dict(method="dpo", ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(1)),
                        ValueError, "ref_chosen_logps must have the shape of chosen_logps (1,), got (3,)"),
    "variant": (dict(method="amapo", variant="papr"), ValueError, "method='amapo': variant must be one of"),
    "return_stats": (dict(method="amapo", return_stats="yes"), TypeError, "return_stats must be True or False"),
    # before: an AttributeError from inside the all-gather, after the forward
    "amapo group": (dict(method="amapo", group="world"), TypeError, "group must be None or a torch.distributed"),
    "kto group": (dict(method="kto", group=0, ref_chosen_logps=torch.zeros(1), ref_rejected_logps=torch.zeros(1)),
                  TypeError, "group must be None or a torch.distributed ProcessGroup, got int"),
}


@pytest.mark.parametrize("path", ["hidden", "logits"])
@pytest.mark.parametrize("case", BEFORE_THE_FORWARD)
def test_loss_arguments_are_checked_before_the_forward(monkeypatch, case, path):
    """A wrong hyperparameter or reference costs no pass over the lm_head or the logits (before, the whole
    forward ran first)."""
    kwargs, error, fragment = BEFORE_THE_FORWARD[case]
    hidden, weight, labels = hidden_inputs()
    if path == "hidden":
        monkeypatch.setattr("amapo_kernels.fused_linear.sequence_logps_from_hidden", forward_that_must_not_run)
        call = lambda: ak.preference_loss_from_hidden(hidden, weight, labels, **kwargs)  # noqa: E731
    elif kwargs["method"] == "amapo":
        monkeypatch.setattr("amapo_kernels.amapo.sequence_logps", forward_that_must_not_run)
        amapo_kwargs = {k: v for k, v in kwargs.items() if k != "method"}
        call = lambda: ak.amapo_loss_from_logits(hidden @ weight.t(), labels, **amapo_kwargs)  # noqa: E731
    else:
        pytest.skip("amapo_loss_from_logits takes AMaPO's arguments only")
    with pytest.raises(error, match=re.escape(fragment)):
        call()


def forward_that_must_not_run(*args, **kwargs):
    raise AssertionError("the forward ran before the arguments were checked")


# ---------------------------------------------------------------------------------------------
# Hyperparameters: one validation for every method (finite, sign, range), naming method and argument
# ---------------------------------------------------------------------------------------------


def rules(method):
    from amapo_kernels.amapo import RULES as AMAPO_RULES
    from amapo_kernels.preference import BASELINES

    return AMAPO_RULES if method == "amapo" else BASELINES[method].RULES


def bad_values(rule):
    """Values outside a rule: NaN and inf always, the bound itself for an open bound, beyond a closed one."""
    if isinstance(rule, tuple):
        return ["bogus"]
    values = [float("nan"), float("inf"), float("-inf")]
    values.append(rule.low if rule.open_low else rule.low - 0.25)
    if rule.high != float("inf"):
        values.append(rule.high + 0.25)
    return values


HPARAM_CASES = [(method, name, value) for method in ak.METHODS for name, rule in rules(method).items()
                for value in bad_values(rule)]


@pytest.mark.parametrize("method, name, value", HPARAM_CASES, ids=[f"{m}-{n}-{v}" for m, n, v in HPARAM_CASES])
def test_every_method_validates_its_hyperparameters(method, name, value):
    pair = (torch.zeros(2), torch.zeros(2))
    extra = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    if method == "odpo":
        extra.update(chosen_scores=torch.ones(2), rejected_scores=torch.zeros(2))
    if method == "amapo":
        extra = {}
    with pytest.raises(ValueError, match=re.escape(f"method={method!r}: {name} must be")):
        ak.preference_loss(*pair, method=method, **extra, **{name: value})


@pytest.mark.parametrize("method, kwargs, fragment", [
    ("ipo", dict(tau=0.0), "method='ipo': tau must be a finite number in (0.0, inf), got 0.0"),
    ("dpo", dict(beta=-0.1), "method='dpo': beta must be a finite number in (0.0, inf), got -0.1"),
    ("dpo", dict(beta=float("nan")), "method='dpo': beta must be"),
    ("simpo", dict(beta=float("inf")), "method='simpo': beta must be a finite number"),
    ("dpo", dict(label_smoothing=0.7), "method='dpo': label_smoothing must be a finite number in [0.0, 0.5]"),
    ("simpo", dict(label_smoothing=-0.1), "method='simpo': label_smoothing must be a finite number in [0.0, 0.5]"),
])
def test_issue_hyperparameter_cases(method, kwargs, fragment):
    refs = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    with pytest.raises(ValueError, match=re.escape(fragment)):
        ak.preference_loss(torch.zeros(2), torch.zeros(2), method=method, **refs, **kwargs)


def test_hyperparameter_type_is_checked():
    with pytest.raises(TypeError, match=re.escape("method='dpo': beta must be a real number, got str")):
        ak.preference_loss(torch.zeros(2), torch.zeros(2), method="dpo", beta="0.1",
                           ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    with pytest.raises(ValueError, match=re.escape("method='amapo': beta must be")):
        ak.AMaPOLoss(beta=float("inf"))


@pytest.mark.parametrize("method", ak.METHODS)
def test_empty_batch_is_zero_for_every_method(method):
    """B = 0: a loss of exactly 0 with zero gradients, the same for every method (never NaN)."""
    empty = [torch.zeros(0, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    extra = {} if method == "amapo" else dict(ref_chosen_logps=torch.zeros(0), ref_rejected_logps=torch.zeros(0))
    if method == "odpo":
        extra.update(chosen_scores=torch.zeros(0), rejected_scores=torch.zeros(0))
    loss = ak.preference_loss(*empty, method=method, **extra)
    assert loss.item() == 0.0 and loss.dim() == 0
    grads = torch.autograd.grad(loss, empty)
    assert all(g.shape == (0,) for g in grads)


@pytest.mark.parametrize("position", range(4))
@pytest.mark.parametrize("method", ["dpo", "focalpo"])
def test_infinite_log_prob_gives_the_limit(method, position):
    """A log-prob of -inf drives h to +inf or -inf. The limits: DPO 0 (h = +inf) or inf (h = -inf, its gradient
    -beta finite); FocalPO 0 either way (-(p**gamma) log p -> 0 as p -> 0), with finite gradients. Never NaN."""
    tensors = [torch.zeros(1, dtype=torch.float64) for _ in range(4)]
    tensors[position] = torch.full((1,), float("-inf"), dtype=torch.float64)
    leaves = [t.requires_grad_() for t in tensors[:2]]
    loss = ak.preference_loss(*leaves, method=method, ref_chosen_logps=tensors[2], ref_rejected_logps=tensors[3])
    h_is_minus_inf = position in (0, 3)
    expected = float("inf") if (method == "dpo" and h_is_minus_inf) else 0.0
    assert loss.item() == expected
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------
# ignore_index, logit_softcap, shapes: validated the same way on the from-logits and from-hidden paths
# ---------------------------------------------------------------------------------------------


def hidden_inputs(steps=3):
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, steps, 4, generator=generator, dtype=torch.float64)
    weight = torch.randn(V, 4, generator=generator, dtype=torch.float64)
    return hidden, weight, torch.randint(0, V, (2, steps), generator=generator)


def logits_of(hidden, weight):
    return hidden @ weight.t()


PATHS = {
    "logits": lambda hidden, weight, labels, **kw: ak.sequence_logps(logits_of(hidden, weight), labels, **kw),
    "hidden": lambda hidden, weight, labels, **kw: ak.sequence_logps_from_hidden(hidden, weight, labels, **kw),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("value, error, fragment", [
    (1.7, TypeError, "ignore_index must be an int, got float 1.7"),
    (-100.0, TypeError, "ignore_index must be an int"),
    (True, TypeError, "ignore_index must be an int"),
    ("-100", TypeError, "ignore_index must be an int, got str"),
    (2**63, ValueError, "ignore_index must fit in int64, got 9223372036854775808"),
    (-(2**63) - 1, ValueError, "ignore_index must fit in int64"),
])
def test_bad_ignore_index(path, value, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        PATHS[path](*hidden_inputs(), ignore_index=value)


@pytest.mark.parametrize("path", PATHS)
def test_integer_like_ignore_index(path):
    """numpy and 0-d tensor integers are ints: accepted on both paths, with the same result as the int."""
    hidden, weight, labels = hidden_inputs()
    labels[0, 1] = -1
    expected = PATHS[path](hidden, weight, labels, ignore_index=-1)
    for value in (np.int64(-1), np.int32(-1), torch.tensor(-1)):
        assert torch.equal(PATHS[path](hidden, weight, labels, ignore_index=value), expected)
    torch.testing.assert_close(PATHS["logits"](hidden, weight, labels, ignore_index=np.int64(-1)), expected,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("value, error, fragment", [
    (float("inf"), ValueError, "logit_softcap must be None or a positive number within float32's normal range "
                               "[1.18e-38, 3.4e+38] (c * tanh(z / c) is computed in float32), got inf"),
    (1e39, ValueError, "float32's normal range [1.18e-38, 3.4e+38] (c * tanh(z / c) is computed in float32), got 1e+39"),
    (1e-46, ValueError, "got 1e-46"),  # 0 in float32: the gradient was NaN on every backend
    (float("nan"), ValueError, "logit_softcap must be None or a positive number"),
    (-1.0, ValueError, "logit_softcap must be None or a positive number"),
    ("30", TypeError, "logit_softcap must be None or a real number, got str"),
    (True, TypeError, "logit_softcap must be None or a real number, got bool"),  # not c = 1.0
])
def test_bad_logit_softcap(value, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        ak.sequence_logps_from_hidden(*hidden_inputs(), logit_softcap=value)


@pytest.mark.parametrize("path", PATHS)
def test_no_steps_with_shift(path):
    hidden, weight, labels = hidden_inputs(steps=0)
    with pytest.raises(ValueError, match=re.escape("shift=True needs T >= 1")):
        PATHS[path](hidden, weight, labels, shift=True)


@pytest.mark.parametrize("api", ["sequence_logps", "amapo_loss_from_logits"])
def test_no_steps_with_shift_on_meta_tensors(api):
    """Meta (fake) tensors reach the op's fake kernel, not its C++ check (before: a RuntimeError about a
    negative dimension)."""
    logits, labels = logits_labels(steps=0)
    with pytest.raises(ValueError, match=re.escape("shift=True needs T >= 1")):
        getattr(ak, api)(logits.to("meta"), labels.to("meta"), shift=True)


@pytest.mark.parametrize("value", [10**400, -(10**400)], ids=["10**400", "-10**400"])
def test_int_beyond_float_range_is_a_value_error(value):
    """A Python int that no float holds is a non-finite hyperparameter (before: OverflowError from float())."""
    with pytest.raises(ValueError, match=re.escape("method='amapo': beta must be a finite number")):
        ak.amapo_loss(torch.zeros(2), torch.zeros(2), beta=value)
    with pytest.raises(ValueError, match="logit_softcap must be None or a positive number"):
        ak.sequence_logps_from_hidden(*hidden_inputs(), logit_softcap=value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_hidden_at_ignored_positions_is_not_read(value):
    """As the from-logits path never reads an ignored row, the from-hidden path ignores a non-finite hidden state
    at an ignored position: log-probs and every gradient equal those of a clean hidden state there."""
    hidden, weight, labels = hidden_inputs(steps=4)
    labels[1, 2] = -100  # with shift, hidden[1, 1] scores labels[1, 2]
    results = []
    for poison in (0.0, value):
        h = hidden.clone()
        h[1, 1, 2] = poison
        h.requires_grad_()
        w = weight.clone().requires_grad_()
        out = ak.sequence_logps_from_hidden(h, w, labels, shift=True)
        results.append((out, *torch.autograd.grad(out.sum(), (h, w))))
    for clean, poisoned in zip(*results):
        assert torch.isfinite(poisoned).all()
        torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)


def test_odpo_refuses_tied_scores():
    """ODPO's offset is log(score_w - score_l): a tie would make it -inf and the pair's loss 0, silently; chosen_scores
    must exceed rejected_scores strictly, on every pair."""
    pair = (torch.zeros(2), torch.zeros(2))
    refs = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    with pytest.raises(ValueError, match="chosen_scores must exceed rejected_scores on every pair"):
        ak.preference_loss(*pair, method="odpo", chosen_scores=torch.tensor([2.0, 1.0]),
                           rejected_scores=torch.tensor([1.0, 1.0]), **refs)


# ---------------------------------------------------------------------------------------------
# Checks that nothing behind them repeats: meta tensors, closed bounds, the from-hidden arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["empty vocabulary", "strided vocabulary"])
@pytest.mark.parametrize("api", ["sequence_logps", "amapo_loss_from_logits"])
def test_logits_checks_run_on_meta_tensors(case, api):
    """Meta tensors (as torch.compile's fake ones) reach the ops' fake kernels, not the C++ checks: the wrapper's
    own checks are the only ones there."""
    _, logits, labels, error, fragment = next(c for c in LOGITS_CASES if c[0] == case)
    with pytest.raises(error, match=re.escape(fragment)):
        getattr(ak, api)(logits.to("meta"), labels.to("meta"))


def test_inplace_backward_refuses_shared_elements_before_the_forward():
    """The wrapper refuses expanded logits at the call, not only later in the backward op."""
    logits, labels = logits_labels()
    with pytest.raises(ValueError, match="inplace_backward=True needs logits whose elements do not share memory"):
        ak.sequence_logps(logits[:, :1].expand(-1, 3, -1), labels, inplace_backward=True)


@pytest.mark.parametrize("method", ak.METHODS)
def test_every_method_checks_the_pair_shapes(method):
    """Mismatched chosen / rejected log-probs would broadcast into a loss over the wrong pairs."""
    extra = {} if method == "amapo" else dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    if method == "odpo":
        extra.update(chosen_scores=torch.ones(2), rejected_scores=torch.zeros(2))
    with pytest.raises(ValueError, match=re.escape("rejected_logps must have the shape of chosen_logps (2,), got (1,)")):
        ak.preference_loss(torch.zeros(2), torch.zeros(1), method=method, **extra)


def test_reference_logps_must_be_floating():
    """Integer tensors are accepted as ODPO's scores (ratings), never as reference log-probs."""
    with pytest.raises(TypeError, match="ref_chosen_logps must have dtype in .*, got torch.int64"):
        ak.preference_loss(torch.zeros(2), torch.zeros(2), method="dpo", ref_chosen_logps=torch.zeros(2, dtype=torch.long),
                           ref_rejected_logps=torch.zeros(2))


def test_bool_hyperparameter_is_refused():
    with pytest.raises(TypeError, match=re.escape("method='dpo': beta must be a real number, got bool")):
        ak.preference_loss(torch.zeros(2), torch.zeros(2), method="dpo", beta=True,
                           ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))


def test_closed_upper_bounds_are_allowed():
    """label_smoothing = 0.5 lies in [0.0, 0.5], and the float32 maximum in the softcap's range."""
    refs = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    for method, extra in (("amapo", {}), ("dpo", refs), ("simpo", {})):
        assert torch.isfinite(ak.preference_loss(torch.zeros(2), torch.zeros(2), method=method, label_smoothing=0.5,
                                                 **extra))
    out = ak.sequence_logps_from_hidden(*hidden_inputs(), logit_softcap=torch.finfo(torch.float32).max)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("value", [-(2**63), 2**63 - 1])
def test_ignore_index_at_the_int64_bounds(path, value):
    hidden, weight, labels = hidden_inputs()
    expected = PATHS[path](hidden, weight, labels)
    labels[0, 1], expected_labels = value, labels.clone()
    expected_labels[0, 1] = -100
    torch.testing.assert_close(PATHS[path](hidden, weight, labels, ignore_index=value),
                               PATHS[path](hidden, weight, expected_labels))
    assert not torch.equal(PATHS[path](hidden, weight, labels, ignore_index=value), expected)


FROM_HIDDEN_CASES = {  # (override, error, message fragment): the from-hidden path's own argument checks
    "weight narrower than H": (dict(lm_head_weight=torch.zeros(V, 3, dtype=torch.float64)), ValueError,
                               "lm_head_weight must be [V, H] with H = hidden.shape[2] = 4, got (7, 3)"),
    "bias of one element": (dict(bias=torch.zeros(1, dtype=torch.float64)), ValueError,  # would broadcast
                            "bias must be [V] = [7] to match lm_head_weight, got (1,)"),
    "bias on meta": (dict(bias=torch.zeros(V, dtype=torch.float64, device="meta")), ValueError,
                     "tensors must be on one device"),
    "token_chunk True": (dict(token_chunk=True), ValueError, "token_chunk must be a positive int, got True"),
    "vocab_chunk True": (dict(vocab_chunk=True), ValueError, "vocab_chunk must be a positive int, got True"),
}


@pytest.mark.parametrize("case", FROM_HIDDEN_CASES)
def test_from_hidden_arguments(case):
    override, error, fragment = FROM_HIDDEN_CASES[case]
    hidden, weight, labels = hidden_inputs()
    kwargs = {"lm_head_weight": weight, **override}
    with pytest.raises(error, match=re.escape(fragment)):
        ak.sequence_logps_from_hidden(hidden, kwargs.pop("lm_head_weight"), labels, **kwargs)


# ---------------------------------------------------------------------------------------------
# Direct op calls: every shape, dtype and size the kernels index by is checked in C++ (CPU and CUDA host code)
# ---------------------------------------------------------------------------------------------


def direct_calls(device):
    """(name, call, error, message fragment) of direct op calls with one bad argument each."""
    logits, labels = (x.to(device) for x in logits_labels())
    _, stats = ops.sequence_logps_fwd(logits, labels, -100, True, False)
    ones = torch.ones(2, device=device)
    pairs, moments = torch.zeros(2, device=device), torch.zeros(4, dtype=torch.float64, device=device)
    return [
        ("labels T mismatch", lambda: ops.sequence_logps_fwd(logits, labels[:, :2], -100, True, False),
         ValueError, "disagree on B or T"),
        ("int32 labels", lambda: ops.sequence_logps_fwd(logits, labels.int(), -100, True, False),
         TypeError, "labels must be int64"),
        ("shift with T = 0", lambda: ops.sequence_logps_fwd(logits[:, :0], labels[:, :0], -100, True, True),
         ValueError, "shift=True needs T >= 1"),
        ("empty vocabulary", lambda: ops.sequence_logps_fwd(logits[..., :0], torch.full_like(labels, -100), -100, True,
                                                            False), ValueError, "empty vocabulary"),
        ("grad of another B", lambda: ops.sequence_logps_bwd(ones[:1], logits, labels, stats, -100, True, False),
         ValueError, "grad must be [B]"),
        ("softmax_stats [B, T, 1]", lambda: ops.sequence_logps_bwd(ones, logits, labels, stats[..., :1], -100, True,
                                                                  False), ValueError, "softmax_stats must be"),
        ("float64 softmax_stats", lambda: ops.sequence_logps_bwd(ones, logits, labels, stats.double(), -100, True,
                                                                False), TypeError, "softmax_stats must be Float"),
        ("float32 batch_moments", lambda: ops.amapo_loss_fwd(pairs, pairs, moments.float(), 2.0, 0.0, "code", "none"),
         ValueError, "batch_moments must be float64"),
        ("rejected of another B", lambda: ops.amapo_loss_fwd(pairs, pairs[:1], moments, 2.0, 0.0, "code", "none"),
         ValueError, "rejected_logps must have the shape of chosen_logps"),
        ("margins of another B", lambda: ops.amapo_loss_bwd(torch.ones((), device=device), pairs, pairs, pairs[:1],
                                                           2.0, 0.0), ValueError, "margins, chosen_logps and"),
        ("grad not a scalar", lambda: ops.amapo_loss_bwd(ones, pairs, pairs, pairs, 2.0, 0.0),
         ValueError, "grad must be a scalar"),
    ]


DIRECT_CALLS = [name for name, *_ in direct_calls("cpu")]


@pytest.mark.parametrize("case", DIRECT_CALLS)
def test_direct_op_calls_check_every_argument(device, case):
    """The wrappers check first, but the ops are public (torch.ops.amapo_kernels) and the kernels index memory by
    these shapes and dtypes: each bad argument is refused by the op itself, naming it."""
    _, call, error, fragment = next(c for c in direct_calls(device) if c[0] == case)
    with pytest.raises(error, match=re.escape(fragment)):
        call()


def test_direct_op_calls_take_empty_inputs(device):
    """No row (B = 0) or no step (T = 0): empty results, no error and no read."""
    logits, labels = (x.to(device) for x in logits_labels())
    for rows in (slice(0, 0), slice(None)):
        steps = slice(None) if rows.stop == 0 else slice(0, 0)
        seq, stats = ops.sequence_logps_fwd(logits[rows, steps], labels[rows, steps], -100, True, False)
        assert seq.shape == (logits[rows].shape[0],) and stats.numel() == 0
        grad = ops.sequence_logps_bwd(torch.ones_like(seq), logits[rows, steps], labels[rows, steps], stats, -100,
                                      True, False)
        assert grad.shape == logits[rows, steps].shape


def test_direct_op_calls_on_meta_tensors_check_their_arguments():
    """The fake (meta) kernels refuse what the real ops refuse, instead of returning tensors of made-up shapes
    (before: logits [2, 3, V] with labels [3, 3] gave seq_logps of shape [3])."""
    logits, labels = torch.randn(2, 3, V, device="meta"), torch.zeros(2, 3, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="disagree on B or T"):
        ops.sequence_logps_fwd(logits, torch.zeros(3, 3, dtype=torch.long, device="meta"), -100, True, False)
    with pytest.raises(TypeError, match="labels must be int64"):
        ops.sequence_logps_fwd(logits, labels.int(), -100, True, False)
    with pytest.raises(ValueError, match="empty vocabulary"):
        ops.sequence_logps_fwd(logits[..., :0], labels, -100, True, False)
    with pytest.raises(ValueError, match="shift=True needs T >= 1"):
        ops.sequence_logps_fwd(logits[:, :0], labels[:, :0], -100, True, True)
    _, stats = ops.sequence_logps_fwd(logits, labels, -100, True, False)
    with pytest.raises(ValueError, match="softmax_stats must be"):
        ops.sequence_logps_bwd(torch.ones(2, device="meta"), logits, labels, stats[:, :1], -100, True, False)
    pairs, moments = torch.zeros(2, device="meta"), torch.zeros(4, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="rejected_logps must have the shape of chosen_logps"):
        ops.amapo_loss_fwd(pairs, pairs[:1], moments, 2.0, 0.0, "code", "none")
    with pytest.raises(ValueError, match="variant must be"):
        ops.amapo_loss_fwd(pairs, pairs, moments, 2.0, 0.0, "x", "none")
    with pytest.raises(TypeError, match="chosen_logps must be float32 or float64"):
        ops.amapo_loss_fwd(pairs.long(), pairs.long(), moments, 2.0, 0.0, "code", "none")
    with pytest.raises(ValueError, match="grad must be a scalar"):
        ops.amapo_loss_bwd(pairs, pairs, pairs, pairs, 2.0, 0.0)


@pytest.mark.parametrize("path", ["preference_loss", "preference_loss_from_hidden"])
def test_amapo_checks_reference_logps_it_is_given(path):
    """method='amapo' takes no reference log-probs; given, they are checked as every other method checks them
    (before: a string, or a tensor of another length, was passed over without a word)."""
    for refs, error, fragment in [
        ({"ref_chosen_logps": "garbage"}, TypeError, "ref_chosen_logps must be a torch.Tensor"),
        ({"ref_chosen_logps": torch.zeros(2), "ref_rejected_logps": torch.zeros(5)}, ValueError,
         "ref_rejected_logps must have the shape of chosen_logps (2,)"),
        ({"ref_rejected_logps": torch.zeros(2, dtype=torch.long)}, TypeError, "ref_rejected_logps must have dtype"),
    ]:
        with pytest.raises(error, match=re.escape(fragment)):
            if path == "preference_loss":
                ak.preference_loss(torch.randn(2), torch.randn(2), method="amapo", **refs)
            else:
                ak.preference_loss_from_hidden(torch.randn(4, 3, 4), torch.randn(V, 4),
                                               torch.zeros(4, 3, dtype=torch.long), method="amapo", **refs)
    ak.preference_loss(torch.randn(2), torch.randn(2), method="amapo", ref_chosen_logps=torch.zeros(2),
                       ref_rejected_logps=torch.zeros(2))  # valid ones are still accepted (and unused)


@pytest.mark.parametrize("method, name", [("kto", "beta"), ("odpo", "alpha"), ("alpha_dpo", "beta")])
def test_hyperparameter_beyond_the_compute_dtype_is_refused(method, name):
    """A hyperparameter above float32's largest value is finite as a Python float but inf once it multiplies a
    float32 tensor: kto's loss (bounded, 0.4167 in fp64) came out NaN. Refused naming it; float64 log-probs take it."""
    chosen, rejected = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -1.0, -3.5])
    reference = torch.tensor([-1.5, -1.5, -3.0])
    refs = {"ref_chosen_logps": reference, "ref_rejected_logps": reference}
    extra = ({"chosen_scores": torch.tensor([2.0, 3.0, 4.0]), "rejected_scores": torch.ones(3)} if method == "odpo"
             else {})
    with pytest.raises(ValueError, match=re.escape(f"method={method!r}: {name} must be within torch.float32's range")):
        ak.preference_loss(chosen, rejected, method=method, **refs, **extra, **{name: 1e39})
    hidden, labels = torch.randn(6, 3, 4), torch.zeros(6, 3, dtype=torch.long)  # 3 pairs, chosen rows first
    with pytest.raises(ValueError, match=re.escape(f"method={method!r}: {name} must be within torch.float32's range")):
        ak.preference_loss_from_hidden(hidden, torch.randn(V, 4), labels, method=method, **refs, **extra,
                                       **{name: 1e39})
    as64 = {key: value.double() for key, value in refs.items()}
    loss = ak.preference_loss(chosen.double(), rejected.double(), method=method, **as64, **extra, **{name: 1e39})
    expected = ref.preference_loss(chosen.double(), rejected.double(), method=method, **as64,
                                   **{k: v.double() for k, v in extra.items()}, **{name: 1e39})
    torch.testing.assert_close(loss, expected)
