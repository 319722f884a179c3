"""What both benchmarks share: timing, peak memory, the record of where and how a table was measured."""

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import amapo_kernels
from amapo_train.cli_errors import UserError, check_output_path, expanded_path, one_line


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit status 2 (no usage block), as the console scripts'."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_at_least(low: int):
    """argparse type: an integer >= low."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def positive_float(text):
    """argparse type: a finite number > 0 (a time limit: 0, a negative or nan would leave nothing to run)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def names_of(known):
    """argparse type: comma-separated names, each one of `known` (a typo is refused, never run as a default)."""

    def parse(text):
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = ", ".join(repr(name) for name in names if name not in known)
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{'unknown ' + unknown if unknown else 'none given'}; known: "
                                             f"{', '.join(known)}")
        return names

    return parse


def output_path(directory=False):
    """argparse type: a file (a folder with `directory`) the results can be written to, by amapo-train's rule
    (cli_errors.check_output_path: not a directory where a file is due, its nearest existing folder writable).
    Checked when the arguments are parsed: a typo must not cost the measurements made before the first write."""

    def parse(text):
        try:
            check_output_path("", text, directory=directory)
        except UserError as error:
            raise argparse.ArgumentTypeError(one_line(error)) from None
        return expanded_path("", text)  # where it was checked: a quoted ~/x is not ./~/x

    return parse


def unavailable_backend(backend, dtype, device, gradient_filter=False):
    """Why amapo_loss_from_hidden(backend=backend) cannot run on `device` here, None if it can. The library's own
    rule decides (fused_linear._resolve_backend: the Triton-module backends need CUDA tensors, or the CPU under
    TRITON_INTERPRET=1), on a 1 x 1 probe, so that a benchmark refuses when parsing, not after its other rows."""
    from amapo_kernels.fused_linear import _resolve_backend

    probe = torch.zeros(1, 1, dtype=dtype, device=device)
    try:
        _resolve_backend(backend, gradient_filter, probe, probe, None)
    except (ImportError, TypeError, ValueError) as error:  # ImportError: no triton here
        return one_line(error)
    return None


def sizes_of(dims: str):
    """argparse type: comma-separated sizes of the form `dims` ("BxTxV"), positive integers with B even (B
    rows: B/2 chosen, then B/2 rejected), kept as the strings the tables show."""

    def parse(text):
        sizes = [item for item in text.split(",") if item]
        for item in sizes:
            parts = item.split("x")
            if len(parts) != dims.count("x") + 1 or not all(part.isdigit() and int(part) > 0 for part in parts):
                raise argparse.ArgumentTypeError(f"{item!r} is not {dims} in positive integers")
            if int(parts[0]) % 2:
                raise argparse.ArgumentTypeError(f"{item!r}: B must be even (chosen rows, then rejected)")
        if not sizes:
            raise argparse.ArgumentTypeError("no size given")
        return sizes

    return parse


def time_ms(run, device, warmup, repeats, prepare=None):
    """Median wall time of run() in ms after `warmup` untimed runs: CUDA events on a GPU, perf_counter on
    the CPU. prepare() (untimed) runs before each, e.g. to restore inputs that a peer overwrites."""
    prepare = prepare or (lambda: None)
    for _ in range(warmup):
        prepare()
        run()
    times = []
    for _ in range(repeats):
        prepare()
        if device == "cuda":
            # prepare's work (a logits-sized copy for the peers that overwrite them) done before the start event:
            # else the host ran ahead of it, and the run's launches until its first host sync went untimed
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            run()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def compiled_for_this_size(fn):
    """torch.compile(fn) with fresh caches and static shapes, made for one size of a benchmark: Dynamo keys its
    graphs by fn's code, not by the torch.compile wrapper, so a wrapper per size still shared one cache, the
    second size turned the graph dynamic (automatic dynamic shapes) and every later size ran that graph; past
    the recompile limit, fn would run uncompiled."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def cuda_peak_extra_bytes(run, prepare=None, gradient_bytes=0):
    """Peak bytes allocated during run() beyond what was allocated once prepare() had run (the inputs, and
    what the caller holds), less `gradient_bytes`. prepare() must free whatever a previous run left (its
    gradients): held at the baseline, they would be subtracted from the run that frees and refills them.
    With gradient_bytes the size of the inputs' gradients, the figure is what a run needs beyond its inputs
    and their gradients."""
    if prepare:
        prepare()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before - gradient_bytes


# Each row's loss and gradients are compared with the reference implementation of the same loss (plain
# PyTorch, amapo_kernels.reference) on the same inputs: a peer wired wrongly (a shift off by one, a prompt
# scored, another normalization) is off by order 1, a correct one by its dtype's rounding. Beyond this
# relative error a row is marked as disagreeing.
AGREEMENT_LIMIT = 0.05


def relative_error(actual, expected):
    """||actual - expected|| / ||expected|| in fp32 (0 if both are 0; inf where either holds a NaN: a NaN error
    would lose every comparison, and max() over the errors, or the limit, would pass it as agreeing)."""
    difference = torch.linalg.vector_norm(actual.float() - expected.float()).item()
    scale = torch.linalg.vector_norm(expected.float()).item()
    if math.isnan(difference) or math.isnan(scale):
        return float("inf")
    return difference / scale if scale else (0.0 if difference == 0 else float("inf"))


def agreement(loss, grads, expected_loss, expected_grads):
    """{"loss_error", "grad_error"}: relative errors of a run's loss and of its worst gradient."""
    return {"loss_error": relative_error(loss.detach(), expected_loss),
            "grad_error": max(relative_error(g, e) for g, e in zip(grads, expected_grads))}


def disagreement(errors, gradient_filter=False):
    """A note for a row whose loss or gradient is off the reference by more than AGREEMENT_LIMIT, else None.
    With a gradient filter (tiles of small softmax skipped in the backward by design) only the loss must
    agree, and a gradient beyond the limit is reported as the filter's error."""
    if errors["loss_error"] <= AGREEMENT_LIMIT and errors["grad_error"] > AGREEMENT_LIMIT and gradient_filter:
        return f"gradient filter: its gradient is off the exact one by {errors['grad_error']:.2g} (relative)"
    if max(errors.values()) <= AGREEMENT_LIMIT:
        return None
    return (f"DISAGREES with the reference: loss off by {errors['loss_error']:.2g}, gradient by "
            f"{errors['grad_error']:.2g} (relative)")


def unless_out_of_memory(compute):
    """compute() (a reference's results, or a row's agreement), or None where the device has no memory left
    for it: the rows then carry no agreement ("-") instead of losing their timings or stopping the run."""
    try:
        return compute()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


class InputsDoNotFit(Exception):
    """A size whose inputs this device cannot allocate: its rows say so (or the script stops in one line)."""


def allocated(make):
    """make()'s inputs; an allocation that fails (torch's CPU allocator raises a plain RuntimeError, CUDA's an
    OutOfMemoryError) is InputsDoNotFit naming the size asked, not a traceback from inside the inputs' maker."""
    try:
        return make()
    except RuntimeError as error:
        if not isinstance(error, torch.OutOfMemoryError) and "can't allocate memory" not in str(error):
            raise
        if isinstance(error, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
        in_bytes = re.search(r"allocate (\d+) bytes", str(error))  # CPU: "... tried to allocate N bytes"
        asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", str(error))  # CUDA: "Tried to allocate 2.00 GiB"
        amount = f"{int(in_bytes[1]) / 2**30:.1f} GiB" if in_bytes else asked[1] if asked else "an allocation"
        raise InputsDoNotFit(f"the inputs do not fit in this device's memory ({amount} asked at once)") from None


def format_error(record):
    """The table's cell of a row (or of agreement()'s errors): the larger of its two relative errors, "-"
    where it has none."""
    if record is None or "grad_error" not in record:
        return "-"
    return f"{max(record['loss_error'], record['grad_error']):.1e}"


def copy_bandwidth_gbs():
    """Measured device-to-device copy bandwidth of the current GPU, bytes read + written, GB/s."""
    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    return 2 * source.numel() * 10 / (start.elapsed_time(end) * 1e-3) / 1e9


# Environment variables that change what a benchmark runs or how fast (this library's kernel and tile choices,
# torch's allocator and threads, Inductor's and Triton's settings): a results file's command line carries them.
RUN_SHAPING_VARIABLES = re.compile(r"AMAPO_\w+|THP_MEM_ALLOC_ENABLE|OMP_NUM_THREADS|MKL_NUM_THREADS|PYTORCH_\w+|"
                                   r"TORCHINDUCTOR_\w+|TRITON_\w+|CUDA_VISIBLE_DEVICES")


def command_line() -> str:
    """The command that reproduces this run: the variables of RUN_SHAPING_VARIABLES set here, then python and
    its arguments."""
    variables = [f"{name}={value}" for name, value in sorted(os.environ.items())
                 if RUN_SHAPING_VARIABLES.fullmatch(name)]
    return " ".join(shlex.quote(arg) for arg in [*variables, sys.executable.rsplit("/", 1)[-1], *sys.argv])


def environment(device):
    """Device, driver, versions, date and the command line: what a results file must carry."""
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        # the vector sets in use: ATen's (torch.compile's code follows it) and this library's row kernels
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amapo_cpu_kernels": amapo_kernels.cpu_kernels(),
    }
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
        meta["cuda"] = torch.version.cuda
        try:
            meta["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            meta["driver"] = f"unknown ({error})"
    for package in ("triton", "liger_kernel", "cut_cross_entropy", "trl", "transformers"):
        try:
            from importlib.metadata import version

            meta[package] = version(package.replace("_", "-"))
        except Exception:  # noqa: BLE001 - not installed: recorded as absent
            meta[package] = None
    return meta


def write_results(json_path, payload, markdown_path, markdown, complete):
    """Writes a benchmark's results so far: called after every row, so that a run stopped by a time limit (a
    device call's budget) keeps each row it measured. payload["meta"]["complete"] and the markdown's last line
    say whether the run reached its end."""
    payload["meta"]["complete"] = complete
    if json_path:
        replace_text(json_path, json.dumps(payload, indent=1))
    if markdown_path:
        replace_text(markdown_path,
                     markdown + ("" if complete else "\nPartial: the run stopped before its last row.\n"))


def replace_text(path, text):
    """path's new text, written beside it and renamed over it: a kill mid-write leaves the previous file whole.
    Its folder is made if missing (output_path accepts a folder that can be made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(path.name + ".partial")
    staged.write_text(text)
    os.replace(staged, path)


def markdown_table(columns, rows):
    """rows: lists of cells (already formatted)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
