"""End-to-end training throughput and peak memory of amapo-train's loss paths (issue 13's model run).

Each --loss-impl trains the same randomly initialized model (`--model random:SHAPE`: llama3-1b is
Llama-3.2-1B's body with Llama-3's 128256-token vocabulary and an untied lm_head, 1.50B parameters) for
--steps optimizer steps of AMaPO, in its own `python -m amapo_train.train` process, one after another:

    fused   lm_head fused with the loss, no logits (the Triton kernels on CUDA, torch tiles on the CPU)
    ops     logits materialized, this library's from-logits op
    eager   logits materialized, plain torch log-softmax over fp32 logits (as TRL does)

Data: pairs built from the bundled HH-RLHF dialogues, long enough that truncation cuts every sequence to
exactly --seq-len tokens (the prompt to half of it, each response to the rest), so every step has
2 x --pairs sequences of --seq-len tokens. The tokenizer is the tiny default's (trained on the bundled
data), so label ids lie below its vocabulary although the model scores all 128256 logits.

Reported per impl, from the run's metrics.jsonl: tokens/s, the median over the steps after
--warmup-steps of (prompt + response tokens of the step) / (its wall time), the driver's own
`tokens_per_s`; peak memory (CUDA), the most torch allocated during the run (`peak_memory_gib`, which
includes weights, gradients and optimizer state); the first step's loss and its relative difference from
eager's (one model, one batch: every impl must compute the same loss, within bench_common.AGREEMENT_LIMIT,
else the row says it disagrees); the last step's loss (finite: the run trained). A run that fails gets its
row with the reason from its output: its last error line (else its last line that is not a progress bar).

Liger-Kernel has no row (LIGER_NOT_WIRED, also in the header): its fused-linear preference losses
(chunked_loss.fused_linear_preference, 0.8.5) call the loss on one chunk of chunk_size pairs at a time (1 by
default), and AMaPO's margin needs the mean and std of d over every pair of the batch, so no exact AMaPO runs
through them; bench_fused_linear.py times its fused-linear SimPO against this library's from-hidden path.

    python benchmarks/bench_train.py                      # CPU: llama3-vocab-tiny, short sequences
    python benchmarks/bench_train.py --device cuda        # the issue's run: llama3-1b, seq 2048, ZeRO-3, bf16,
                                                          #   gradient checkpointing, 20 steps
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT))

from amapo_train.cli_errors import UserError, one_line  # noqa: E402
from amapo_train.data import load_records, split_hh_pair  # noqa: E402
from bench_common import (AGREEMENT_LIMIT, Parser, environment, int_at_least, markdown_table,  # noqa: E402
                          output_path, positive_float, write_results)

IMPLS = ("fused", "ops", "eager")
DEFAULTS = {  # device -> (shape, seq_len, steps, warmup steps)
    "cpu": ("llama3-vocab-tiny", 256, 6, 2),
    "cuda": ("llama3-1b", 2048, 20, 5),
}
LIGER_NOT_WIRED = ("Liger-Kernel: not run; its fused-linear preference losses take the loss of one chunk of pairs "
                   "at a time, and AMaPO's margin needs d's mean and std over the whole batch")
# Characters per text: well beyond what the tiny tokenizer needs for --seq-len tokens (~3 characters each).
CHARS_PER_TOKEN = 8


def long_pairs(count: int, seq_len: int) -> list[dict]:
    """`count` records {prompt, chosen, rejected}, each text made of consecutive bundled HH-RLHF dialogues
    until it has CHARS_PER_TOKEN * seq_len characters."""
    dialogues = [split_hh_pair(r["chosen"], r["rejected"]) for r in load_records("bundled:hh-rlhf", "train")]
    target, cursor, records = CHARS_PER_TOKEN * seq_len, 0, []

    def text(part: int) -> str:
        nonlocal cursor
        pieces, size = [], 0
        while size < target:
            piece = dialogues[cursor % len(dialogues)][part]
            pieces.append(piece)
            size += len(piece)
            cursor += 1
        return "".join(pieces)

    for _ in range(count):
        records.append({"prompt": text(0), "chosen": " " + text(1), "rejected": " " + text(2)})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_command(args, impl: str, data: dict, output_dir: Path) -> list[str]:
    flags = {
        "--recipe": "tiny", "--model": f"random:{args.shape}", "--loss": "amapo", "--loss-impl": impl,
        "--dataset": data["train"], "--eval-dataset": data["test"], "--dataset-format": "pairs",
        "--max-length": args.seq_len, "--max-prompt-length": args.seq_len // 2,
        "--per-device-batch-size": args.pairs, "--total-batch-size": args.pairs, "--max-steps": args.steps,
        "--learning-rate": 6e-7, "--eval-steps": 0, "--save-steps": 0, "--save-final": "off",
        "--max-test-pairs": args.pairs, "--eval-batch-size": args.pairs, "--log-with": "none",
        "--bf16": "on" if args.bf16 else "off", "--gradient-checkpointing": "on" if args.checkpointing else "off",
        "--device": args.device, "--output-dir": output_dir,
    }
    if args.deepspeed != "none":
        flags["--deepspeed"] = args.deepspeed
    return [sys.executable, "-m", "amapo_train.train", *[str(part) for item in flags.items() for part in item]]


def run_env(device: str) -> dict:
    """One process, launched without a launcher: DeepSpeed reads its rank from the environment."""
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PYTHONPATH=os.pathsep.join(
                   [str(ROOT / "python"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    return env


# tqdm's redrawn bars (" 40%|████      | 2/5 [00:03<00:04, 1.2s/it]", "3it [00:01, 2.1it/s]"): never a reason
PROGRESS_BAR = re.compile(r"\d+%\||\d+it \[|\d+/\d+ \[|(it/s|s/it)\]")


def failure_reason(log_text: str) -> str | None:
    """Why a run failed, from its output: the last line that reads as an error (a traceback's last line,
    a console script's "error:"), else the last line that is not a progress bar (tqdm draws its bars after
    the error is printed, so the last line alone is often a bar); None for an empty log."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]  # splitlines: tqdm's \r too
    errors = [line for line in lines if "Error" in line or "error:" in line]
    others = [line for line in lines if not PROGRESS_BAR.search(line)]
    return (errors or others or [None])[-1]


def measure(args, impl: str, data: dict, work: Path, limit: float) -> dict:
    """The row of one impl's run, killed after `limit` seconds."""
    output_dir = work / impl
    command = train_command(args, impl, data, output_dir)
    started = time.perf_counter()
    log = output_dir.with_suffix(".log")
    # an earlier run's log in this work dir would be read as this run's if this one stops before starting its own
    (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    with log.open("w") as handle:
        try:
            returncode = subprocess.run(command, env=run_env(args.device), stdout=handle, stderr=subprocess.STDOUT,
                                        cwd=ROOT, timeout=limit).returncode
        except subprocess.TimeoutExpired:  # the run is killed; its row says so and the other impls still run
            returncode = None
    row = {"impl": impl, "wall_s": time.perf_counter() - started, "log": str(log)}
    metrics = output_dir / "metrics.jsonl"
    steps = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if returncode is None:
        row["error"] = f"timed out after {limit:g} s, {len(steps)} of {args.steps} steps logged"
        return row
    if returncode != 0 or len(steps) < args.steps:
        row["error"] = (failure_reason(log.read_text()) or f"exit status {returncode}")[:300]
        return row
    timed = [step["tokens_per_s"] for step in steps[args.warmup_steps:]]
    row.update(tokens_per_s=statistics.median(timed), timed_steps=len(timed), first_loss=steps[0]["loss"],
               last_loss=steps[-1]["loss"], tokens_per_step=args.pairs * 2 * args.seq_len)
    if "peak_memory_gib" in steps[-1]:
        row["peak_memory_gib"] = max(step["peak_memory_gib"] for step in steps)
    return row


def time_limit(timeout: float, budget: float | None, spent: float) -> float | None:
    """Seconds the next impl may run: --timeout, cut to what is left of --budget after `spent` (None: nothing)."""
    limit = timeout if budget is None else min(timeout, budget - spent)
    return limit if limit > 0 else None


def first_loss_note(loss: float, eager_loss: float | None) -> str:
    """The first-step loss against eager's: the relative difference, and whether it is beyond the limit."""
    if eager_loss is None:
        return "-"
    error = abs(loss - eager_loss) / abs(eager_loss) if eager_loss else abs(loss)
    return f"{error:.1e}" + (" DISAGREES" if error > AGREEMENT_LIMIT else "")


def table(rows: list[dict]) -> str:
    eager = next((row for row in rows if row["impl"] == "eager" and "error" not in row), {})
    cells = []
    for row in rows:
        if "error" in row:
            cells.append([row["impl"], "failed: " + row["error"].replace("|", "/"), "", "", "", "", "", ""])
            continue
        speedup = f"{row['tokens_per_s'] / eager['tokens_per_s']:.2f}x" if eager else "-"
        memory = f"{row['peak_memory_gib']:.2f}" if "peak_memory_gib" in row else "-"
        cells.append([row["impl"], f"{row['tokens_per_s']:.0f}", speedup, memory, row["timed_steps"],
                      f"{row['first_loss']:.4f}", first_loss_note(row["first_loss"], eager.get("first_loss")),
                      f"{row['last_loss']:.4f}"])
    return markdown_table(["loss impl", "tokens/s", "vs eager", "peak memory GiB", "steps timed", "first loss",
                           "vs eager's", "last loss"], cells)


def deepspeed_config(text: str) -> str:
    """argparse type: what amapo-train's --deepspeed takes (zero2, zero3, none or a JSON file), by its own rule
    (a typo must not cost a launch of every impl); a file as an absolute path, since the runs start in ROOT."""
    from amapo_train.command_line import check_deepspeed
    from amapo_train.config import CONFIGS, TrainConfig

    config = TrainConfig(deepspeed=text)
    try:
        check_deepspeed(config)
    except UserError as error:
        raise argparse.ArgumentTypeError(one_line(error).removeprefix("--deepspeed ")) from None
    path = config.deepspeed_config_path()
    return text if path is None or Path(path).parent == CONFIGS else str(Path(path).resolve())


def random_shape(text: str) -> str:
    """argparse type: a shape of amapo-train's `--model random:SHAPE`."""
    from amapo_train.model import RANDOM_SHAPES

    if text not in RANDOM_SHAPES:
        raise argparse.ArgumentTypeError(f"unknown shape {text!r}; shapes: {sorted(RANDOM_SHAPES)}")
    return text


def parse_args(argv=None):
    parser = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shape", type=random_shape,
                        help="random:SHAPE model (default: llama3-1b on cuda, llama3-vocab-tiny on cpu)")
    parser.add_argument("--seq-len", type=int_at_least(2), help="tokens per sequence (default 2048 on cuda, 256 on cpu)")
    parser.add_argument("--pairs", type=int_at_least(2), default=2,
                        help="pairs per step (2 x pairs sequences; AMaPO's batch statistics need 2 or more)")
    parser.add_argument("--steps", type=int_at_least(1), help="optimizer steps per impl (default 20 on cuda, 6 on cpu)")
    parser.add_argument("--warmup-steps", type=int_at_least(0), help="first steps left out of tokens/s (default 5 / 2)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {IMPLS}")
    parser.add_argument("--deepspeed", type=deepspeed_config, default="zero3", help="zero3, zero2, none or a JSON file")
    parser.add_argument("--bf16", choices=("on", "off"), help="default: on on cuda")
    parser.add_argument("--checkpointing", choices=("on", "off"), default="on", help="gradient checkpointing")
    parser.add_argument("--timeout", type=positive_float, default=900, help="seconds per impl, at most")
    parser.add_argument("--budget", type=positive_float,
                        help="seconds for all impls together: each may take what the ones before it left, up to "
                             "--timeout (so list the quick impls first); an impl with nothing left is not run")
    parser.add_argument("--work-dir", type=output_path(directory=True),
                        default=str(ROOT / "results" / "bench_train"))  # a string: argparse checks it as typed
    parser.add_argument("--json", type=output_path())
    parser.add_argument("--markdown", type=output_path())
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    shape, seq_len, steps, warmup = DEFAULTS[args.device]
    args.shape = args.shape or shape
    args.seq_len = args.seq_len or seq_len
    args.steps = args.steps or steps
    args.warmup_steps = warmup if args.warmup_steps is None else args.warmup_steps
    args.bf16 = args.device == "cuda" if args.bf16 is None else args.bf16 == "on"
    args.checkpointing = args.checkpointing == "on"
    args.impls = [impl.strip() for impl in args.impls.split(",")]
    for impl in args.impls:
        if impl not in IMPLS:
            parser.error(f"--impls: {impl!r} is not one of {list(IMPLS)}")
    if args.warmup_steps >= args.steps:
        parser.error(f"--warmup-steps {args.warmup_steps} leaves none of --steps {args.steps} to time")
    return args


def main(argv=None):
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    data = {"train": write_jsonl(args.work_dir / "train.jsonl", long_pairs(args.steps * args.pairs, args.seq_len)),
            "test": write_jsonl(args.work_dir / "test.jsonl", long_pairs(args.pairs, args.seq_len))}
    meta = environment(args.device)
    meta.update(shape=args.shape, seq_len=args.seq_len, pairs=args.pairs, steps=args.steps,
                warmup_steps=args.warmup_steps, deepspeed=args.deepspeed, bf16=args.bf16,
                gradient_checkpointing=args.checkpointing, loss="amapo")
    header = (f"# amapo-train throughput: random:{args.shape}, {2 * args.pairs} x {args.seq_len} tokens per step, "
              f"DeepSpeed {args.deepspeed}, bf16 {'on' if args.bf16 else 'off'}, gradient checkpointing "
              f"{'on' if args.checkpointing else 'off'}, {args.steps} steps ({args.warmup_steps} untimed)\n\n"
              f"{meta.get('gpu', 'CPU')}, torch {meta['torch']}, {meta['date']}; command: `{meta['command']}`\n\n"
              f"{LIGER_NOT_WIRED}\n\n")
    rows, started = [], time.perf_counter()
    for impl in args.impls:
        limit = time_limit(args.timeout, args.budget, spent=time.perf_counter() - started)
        if limit is None:  # --timeout is > 0 (its parser), so what ran out is --budget
            rows.append({"impl": impl, "error": f"not run: --budget {args.budget:g} s spent by the impls before it"})
        else:
            rows.append(measure(args, impl, data, args.work_dir, limit))
        write_results(args.json, {"meta": meta, "rows": rows}, args.markdown, header + table(rows),
                      complete=len(rows) == len(args.impls))
    print(header + table(rows))
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
