"""The study's command: runs the SFT starts, every method's grid, the pool sizes; writes the report."""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from amapo_train.cli_errors import (OneLineParser, UserError, check_device, check_output_path, check_range,
                                    home_expanded, run_console_script)
from amapo_train.config import NUMBER_RANGES
from amapo_train.study import hh_rlhf, report
from amapo_train.study.design import BY_LABEL, GRIDS, METHODS, POOL_METHOD, QUICK, StudyConfig, scaled
from amapo_train.study.statistics import summarize, tune
from amapo_train.study.training import run_job, sft_job, single_thread_worker


class InlineExecutor(concurrent.futures.Executor):
    """Runs each job at once in the calling thread (workers=1: a GPU, or no child processes wanted)."""

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # re-raised by future.result(), as a process pool would
            future.set_exception(error)
        return future


@contextlib.contextmanager
def executor(workers: int, device: str):
    if workers > 1:
        context = multiprocessing.get_context("spawn")  # never fork a process whose OpenMP threads already run
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                    initializer=single_thread_worker) as pool:
            yield pool
        return
    threads = torch.get_num_threads()
    if device == "cpu":
        single_thread_worker()  # the same numbers as the worker processes give (reductions split alike)
    try:
        yield InlineExecutor()
    finally:
        torch.set_num_threads(threads)


def run_all(pool, jobs: list[tuple], what: str, log) -> list:
    """Results of the jobs (function, *arguments), in order; progress logged about every tenth."""
    clock = time.perf_counter()
    futures = [pool.submit(*job) for job in jobs]
    every = max(1, len(jobs) // 10)
    results = []
    for done, future in enumerate(futures, 1):
        results.append(future.result())
        if done % every == 0 or done == len(jobs):
            log(f"{what}: {done}/{len(jobs)} in {time.perf_counter() - clock:.0f} s")
    return results


def run_study(config: StudyConfig, workers: int, log=print) -> tuple[dict, dict]:
    """(summary, timing): the SFT start of every seed, every method x setting x seed at the full-batch pool,
    then the tuned POOL_METHOD at the other pool sizes (its setting chosen on validation, as everywhere)."""
    seeds = config.seeds
    with executor(workers, config.device) as pool:
        starts = run_all(pool, [(sft_job, config, seed) for seed in seeds], "SFT", log)
        jobs = [(run_job, config, seed, start, method.label, setting, config.batch_pairs)
                for method in METHODS for setting in method.grid for seed, start in zip(seeds, starts)]
        done = iter(run_all(pool, jobs, "grid runs", log))
        grid_runs = {method.label: [[next(done) for _ in seeds] for _ in method.grid] for method in METHODS}
        chosen = tune(grid_runs[POOL_METHOD])
        setting = BY_LABEL[POOL_METHOD].grid[chosen]
        pools = [size for size in config.pools if size != config.batch_pairs]
        jobs = [(run_job, config, seed, start, POOL_METHOD, setting, size)
                for size in pools for seed, start in zip(seeds, starts)]
        done = iter(run_all(pool, jobs, "pool runs", log))
        pool_runs = {size: [next(done) for _ in seeds] for size in pools}
    pool_runs[config.batch_pairs] = grid_runs[POOL_METHOD][chosen]  # the tuned run: one pool of the whole batch
    pool_runs = dict(sorted(pool_runs.items()))
    seconds = [run["seconds"] for by_setting in grid_runs.values() for by_seed in by_setting for run in by_seed]
    timing = {"runs": len(seconds) + len(pools) * len(seeds), "run_seconds_mean": sum(seconds) / len(seconds),
              "workers": workers, "device": config.device}
    return summarize(config, starts, grid_runs, pool_runs), timing


PROG = "python -m amapo_train.study"


def parse_config(args) -> StudyConfig:
    """The StudyConfig of the command line; every mistake a UserError, raised before any run starts."""
    try:
        torch.device(args.device)
    except RuntimeError as error:
        raise UserError(f"--device {args.device!r}: {error}") from None
    check_device(args.device)  # cpu or cuda (mps, meta, ... parse but fail inside the first run), a GPU that is there
    for seed in args.seeds or ():  # amapo-train's range: 2**64 overflowed torch's generator inside the first run
        check_range("--seeds", seed, *NUMBER_RANGES["seed"])
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    args.out_dir, args.runs_dir = home_expanded("--out-dir", args.out_dir), home_expanded("--runs-dir", args.runs_dir)
    # The results are written only at the end: a directory that cannot be made would lose the whole study.
    check_output_path("--out-dir", args.out_dir, directory=True)
    if args.hh_rlhf:
        check_output_path("--runs-dir", args.runs_dir, directory=True)
    try:
        config = StudyConfig(device=args.device)
        if args.quick:
            config = dataclasses.replace(config, **QUICK)
        config = scaled(config, args.scale)
        if args.seeds:
            config = dataclasses.replace(config, seeds=tuple(args.seeds))
    except ValueError as error:
        raise UserError(str(error)) from None
    return config


def build_parser() -> argparse.ArgumentParser:
    from amapo_train.study import __doc__ as description

    parser = OneLineParser(prog=PROG, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="benchmarks/study")
    parser.add_argument("--quick", action="store_true", help="smoke size: 2 seeds, a few steps, small splits")
    parser.add_argument("--scale", type=int, default=1, help="multiply training pairs and steps (e.g. 4 on a GPU)")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 3 4")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int,
                        help="processes (default: one per CPU core on cpu, 1 on cuda; several may share a GPU)")
    parser.add_argument("--hh-rlhf", action="store_true", help="also train the methods on the bundled HH-RLHF pairs")
    parser.add_argument("--runs-dir", default="runs/study-hh-rlhf", help="checkpoints of the HH-RLHF runs")
    return parser


def run(argv=None) -> dict:
    """The study of the command line `argv`: runs it, writes and prints the report; returns the results."""
    args = build_parser().parse_args(argv)
    config = parse_config(args)
    workers = args.workers or (len(os.sched_getaffinity(0)) if config.device == "cpu" else 1)

    clock = time.perf_counter()
    summary, timing = run_study(config, workers)
    hh = {}
    if args.hh_rlhf:
        labels = ("SimPO", "AMaPO") if args.quick else BY_LABEL
        hh = hh_rlhf.hh_rlhf_study(Path(args.runs_dir), labels, 64 if args.quick else None, config.device)
    timing["total_seconds"] = time.perf_counter() - clock
    # the command line as given, so that results.md says how to regenerate these numbers (--quick, --seeds, ...)
    command = shlex.join([*PROG.split(), *(sys.argv[1:] if argv is None else argv)])
    result = {"config": dataclasses.asdict(config), "grids": GRIDS, "summary": summary, "hh_rlhf": hh,
              "timing": timing, "command": command}
    text = report.markdown(result) + (hh_rlhf.markdown(hh) if hh else "")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(text)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    pngs = report.plots(summary, out_dir)
    print(text)
    print("wrote", out_dir / "results.md", out_dir / "results.json", *pngs)
    return {**result, "report": text}


def main(argv=None) -> int:
    """`python -m amapo_train.study`: exit status 0; a user error is one line on stderr and status 2, as
    amapo-train's and amapo-eval's (argparse's own exits, --help included, pass through)."""
    return run_console_script(PROG, run, argv)
