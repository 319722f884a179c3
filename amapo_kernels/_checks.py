"""Input checks shared by the public functions: each error names the argument at fault.
Only static facts (ranks, shapes, dtypes, devices, layouts) are checked here, so the checks also run
under torch.compile; the label range is checked by the ops themselves before any kernel reads memory."""

import torch

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LOGPS_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_tensor(name: str, value, *, dims: int | None = None, dtypes=None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dims is not None and value.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {value.dtype}")


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


def check_pair_logps(chosen_logps, rejected_logps, **reference) -> None:
    check_tensor("chosen_logps", chosen_logps, dims=1, dtypes=LOGPS_DTYPES)
    check_tensor("rejected_logps", rejected_logps, dims=1, dtypes=LOGPS_DTYPES)
    if rejected_logps.shape != chosen_logps.shape:
        raise ValueError(
            f"rejected_logps must have the shape of chosen_logps {tuple(chosen_logps.shape)}, "
            f"got {tuple(rejected_logps.shape)}"
        )
    for name, value in reference.items():
        if value is None:
            continue
        check_tensor(name, value, dims=1, dtypes=LOGPS_DTYPES)
        if value.shape != chosen_logps.shape:
            raise ValueError(f"{name} must have the shape of chosen_logps {tuple(chosen_logps.shape)}, got {tuple(value.shape)}")
    check_same_device(chosen_logps=chosen_logps, rejected_logps=rejected_logps, **reference)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(c for c in choices if c is not None)}, got {value!r}")


def check_even_batch(name: str, batch) -> None:
    if batch.shape[0] % 2:
        raise ValueError(
            f"{name} must hold an even batch (chosen rows first, then rejected), got B = {batch.shape[0]}"
        )
