"""Input checks shared by the public functions: each error names the argument at fault.
Only static facts (ranks, shapes, dtypes, devices, layouts) are checked here, so the checks also run
under torch.compile; the label range is checked by the ops themselves before any kernel reads memory."""

import math
import numbers
import operator
import sys

import torch
import torch.distributed as dist

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LOGPS_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SCORE_DTYPES = (*LOGPS_DTYPES, torch.int64, torch.int32)  # ODPO's external scores: real numbers


def check_tensor(name: str, value, *, dims: int | None = None, dtypes=None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_nested or value.layout != torch.strided:  # a sparse or nested one failed inside an op, unnamed
        kind = "a nested tensor" if value.is_nested else f"layout {value.layout}"
        raise TypeError(f"{name} must be a dense (strided) tensor, got {kind}")
    if dims is not None and value.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {value.dtype}")


def check_local(name: str, value) -> None:
    """A DTensor (FSDP2's sharded parameters, tensor parallelism) is refused where the computation needs local
    tensors, naming the argument: the fused lm_head's tiles mix it with plain tensors ("got mixed torch.Tensor and
    DTensor" from inside a matmul), and the Triton kernels cannot take its data pointer. A caller that holds one
    has not yet had it gathered (torch.distributed.tensor is then imported: no import is added here)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if value is not None and dtensor is not None and isinstance(value, dtensor.DTensor):
        raise TypeError(
            f"{name} is a DTensor (placements {tuple(value.placements)}); the fused lm_head needs local tensors: pass "
            f"{name}.full_tensor(), or call it inside the forward of the FSDP2 unit that holds the weight (or a "
            "method registered with torch.distributed.fsdp.register_fsdp_forward_method), where it is gathered"
        )


def check_group(group) -> None:
    """group= (the ranks that share a loss's batch statistics): None (the world, when torch.distributed is
    initialized) or a ProcessGroup; anything else failed inside the all-gather, after the forward, naming no
    argument."""
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"group must be None or a torch.distributed ProcessGroup, got {type(group).__name__}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"tensors must be on one device: {listed}")


def check_logits_labels(logits, labels) -> None:
    check_tensor("logits", logits, dims=3, dtypes=LOGITS_DTYPES)
    check_tensor("labels", labels, dims=2, dtypes=(torch.int64,))
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must be [B, T] = {tuple(logits.shape[:2])} to match logits, got {tuple(labels.shape)}")
    if logits.shape[2] == 0:
        raise ValueError("logits has an empty vocabulary (V = 0)")
    if logits.stride(2) != 1 and logits.shape[2] > 1:
        raise ValueError(
            f"logits must have a contiguous vocabulary dimension (stride 1), got strides {logits.stride()}; "
            "call .contiguous() first"
        )
    check_same_device(logits=logits, labels=labels)


def check_pair_logps(chosen_logps, rejected_logps) -> None:
    check_tensor("chosen_logps", chosen_logps, dims=1, dtypes=LOGPS_DTYPES)
    check_tensor("rejected_logps", rejected_logps, dims=1, dtypes=LOGPS_DTYPES)
    if rejected_logps.shape != chosen_logps.shape:
        raise ValueError(
            f"rejected_logps must have the shape of chosen_logps {tuple(chosen_logps.shape)}, "
            f"got {tuple(rejected_logps.shape)}"
        )
    check_same_device(chosen_logps=chosen_logps, rejected_logps=rejected_logps)


def check_per_pair(name: str, value, pairs: int, device: torch.device, dtypes) -> None:
    """A [pairs] tensor that goes with the policy log-probs of `pairs` pairs on `device` (reference log-probs,
    ODPO's scores)."""
    check_tensor(name, value, dims=1, dtypes=dtypes)
    if value.shape[0] != pairs:
        raise ValueError(f"{name} must have the shape of chosen_logps ({pairs},), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"tensors must be on one device: {name} on {value.device}, the log-probs on {device}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(c for c in choices if c is not None)}, got {value!r}")


def check_bool(name: str, value) -> bool:
    """A switch given as True/False (a string such as "false" would silently mean True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_shift(shift, steps: int) -> bool:
    """shift=True pairs position t with label t + 1, so it needs T >= 1 (the ops check it too; meta tensors and the
    from-hidden path, which no op checks first, rely on this one)."""
    check_bool("shift", shift)
    if shift and steps == 0:
        raise ValueError("shift=True needs T >= 1")
    return shift


def check_even_batch(name: str, batch) -> None:
    if batch.shape[0] % 2:
        raise ValueError(
            f"{name} must hold an even batch (chosen rows first, then rejected), got B = {batch.shape[0]}"
        )


class Range:
    """The allowed values of a real hyperparameter: finite and within [low, high] (an end excluded if open)."""

    def __init__(self, low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False):
        self.low, self.high, self.open_low, self.open_high = low, high, open_low, open_high

    def __contains__(self, value: float) -> bool:
        # comparisons only (NaN fails the first, inf the last): under torch.compile a hyperparameter that
        # varies between calls is a symbolic float, which math.isfinite cannot take (and whose `< inf` the
        # compiler takes as true for any value)
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below and abs(value) <= sys.float_info.max

    def __str__(self) -> str:
        high = "inf)" if self.high == math.inf else f"{self.high}{')' if self.open_high else ']'}"
        return f"{'(' if self.open_low else '['}{self.low}, {high}"


POSITIVE = Range(0.0, open_low=True)
NON_NEGATIVE = Range(0.0)
SMOOTHING = Range(0.0, 0.5)  # cDPO / SimPO / AMaPO label smoothing: beyond 0.5 the labels flip
DECAY = Range(0.0, 1.0, open_high=True)  # a running statistic's weight on its past: 1 would never update


def _as_float(value) -> float:
    """float(value), with a Python int beyond float's range (where float() raises OverflowError) taken as
    infinite, so that the range check refuses it as any other non-finite number."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def check_hparams(method: str, hparams: dict, rules: dict) -> None:
    """The one validation of every method's hyperparameters: rules maps a name to a Range (a finite real
    number inside it) or to a tuple of allowed choices. The error names the method and the argument."""
    for name, rule in rules.items():
        value = hparams[name]
        if isinstance(rule, tuple):
            check_choice(f"method={method!r}: {name}", value, rule)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"method={method!r}: {name} must be a real number, got {type(value).__name__}")
        if _as_float(value) not in rule:
            raise ValueError(f"method={method!r}: {name} must be a finite number in {rule}, got {value!r}")


def check_ignore_index(ignore_index) -> int:
    """ignore_index as a Python int (numpy and 0-d integer tensors accepted), within int64; the same check
    on every path (from logits, from hidden states)."""
    if isinstance(ignore_index, bool) or isinstance(ignore_index, float):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    try:
        value = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}") from None
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {value}")
    return value


# The softcap's kernels divide and multiply by c in float32: outside its normal range c is 0 or inf there (NaN)
SOFTCAP = Range(torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max)


def check_logit_softcap(logit_softcap) -> float | None:
    """None (no softcap) or a positive number c within float32's normal range (logits c * tanh(z / c)), as a
    float."""
    if logit_softcap is None:
        return None
    if isinstance(logit_softcap, bool) or not isinstance(logit_softcap, numbers.Real):
        raise TypeError(f"logit_softcap must be None or a real number, got {type(logit_softcap).__name__}")
    if _as_float(logit_softcap) not in SOFTCAP:
        raise ValueError(f"logit_softcap must be None or a positive number within float32's normal range "
                         f"[{SOFTCAP.low:.3g}, {SOFTCAP.high:.3g}] (c * tanh(z / c) is computed in float32), "
                         f"got {logit_softcap!r}")
    return float(logit_softcap)


def check_data(ok: torch.Tensor, message: str) -> None:
    """A check on tensor values (a 0-d bool tensor `ok`). Eager: a ValueError (one host sync). Under
    torch.compile: an assertion inside the graph, raising a RuntimeError with the same message when the
    compiled code runs, so that fullgraph tracing needs no data-dependent branch."""
    if torch.compiler.is_compiling():
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message)
