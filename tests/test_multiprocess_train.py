"""The training driver on 2 CPU processes (torchrun, gloo) against one process: the held-out metrics during
training count every held-out pair once (accelerate pads the last evaluation batch of every process with repeats),
a checkpoint without DeepSpeed resumes on 2 processes, and a DeepSpeed checkpoint is resumed on the number of
processes that saved it or refused in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port

from amapo_train.train import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--max-train-pairs", "64", "--log-with", "none", "--device", "cpu", "--total-batch-size", "8",
        "--save-final", "off"]


def launch(args, processes, deepspeed=False):
    """amapo-train on `processes` CPU processes: torchrun for 2, no launcher for 1 (as a user would start it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH")]))}
    if deepspeed:
        env["DS_ACCELERATOR"] = "cpu"
    for variable in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                                          f"--master_port={free_port()}"]
    return subprocess.run([sys.executable, *launcher, "-m", "amapo_train.train", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_eval_during_training_counts_each_held_out_pair_once(tmp_path):
    """20 held-out pairs, --eval-batch-size 8 on 2 processes: AMaPO's statistics pools are 16 pairs and then 4
    (rank 0's last batch is completed with 4 repeats, rank 1's is 8 repeats), as one process with
    --eval-batch-size 16; the eval_ metrics are the same (learning rate 0: the same model)."""
    common = [*TINY, "--max-test-pairs", "20", "--learning-rate", "0", "--max-steps", "1", "--eval-steps", "1"]
    two = tmp_path / "two"
    proc = launch([*common, "--per-device-batch-size", "4", "--eval-batch-size", "8", "--output-dir", str(two)], 2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    main([*common, "--per-device-batch-size", "8", "--eval-batch-size", "16", "--output-dir", str(tmp_path / "one")])
    [a] = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    [b] = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)  # the same training batch and model
    for key in ("eval_loss", "eval_batch_margin_mean", "eval_batch_margin_std", "eval_rewards/accuracies",
                "eval_rewards/margins", "eval_ranking_accuracy/summed"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_a_deepspeed_checkpoint_resumes_on_its_own_number_of_processes(tmp_path):
    """ZeRO-2's optimizer state is partitioned over the processes that saved it: a resume on another number is one
    line (exit status 2) before anything loads, not DeepSpeed's traceback after the model has loaded."""
    out = tmp_path / "run"
    common = [*TINY, "--max-test-pairs", "8", "--per-device-batch-size", "4", "--max-steps", "2", "--deepspeed", "zero2",
              "--output-dir", str(out)]
    first = launch([*common, "--stop-after-steps", "1"], 1, deepspeed=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # the logged grad_norm is the engine's (DeepSpeed clips by itself), before its clipping to 1.0: the norm that
    # torch's clipping reports without DeepSpeed (1.856337 here, torch's fp32 norm; the engine's, 1.856362, is the
    # fp64 norm's to 7 digits)
    plain = tmp_path / "plain"
    alone = launch([*common[:-4], "--output-dir", str(plain), "--stop-after-steps", "1"], 1)
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
    engine, torch_norm = (json.loads((d / "metrics.jsonl").read_text())["grad_norm"] for d in (out, plain))
    assert engine == pytest.approx(torch_norm, rel=1e-4) and torch_norm > 1.0
    resumed = launch([*common, "--resume", "last"], 2, deepspeed=True)
    assert resumed.returncode != 0
    assert (f"amapo-train: error: --resume last: {out / 'checkpoint-1'} is a DeepSpeed checkpoint of 1 process(es), "
            "this launch has 2") in resumed.stderr, resumed.stderr[-3000:]
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text()).get("world_size") == 1


def test_a_checkpoint_resumes_on_two_processes_without_deepspeed(tmp_path):
    """DDP on 2 processes: each loads the checkpoint's from_pretrained weights (state/ holds no model of its own)
    and the resumed run has the uninterrupted run's losses."""
    common = [*TINY, "--max-test-pairs", "8", "--per-device-batch-size", "4", "--max-steps", "4"]
    for name, extra in (("straight", []), ("split", ["--stop-after-steps", "2"]), ("split", ["--resume", "last"])):
        proc = launch([*common, "--output-dir", str(tmp_path / name), *extra], 2)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (tmp_path / "split" / "checkpoint-2" / "state" / "model.safetensors").exists()
    straight, resumed = ([json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text()
                          .splitlines()] for name in ("straight", "split"))
    assert len(resumed) == 4 and resumed == pytest.approx(straight, rel=1e-6)
