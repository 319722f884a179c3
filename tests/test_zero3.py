"""DeepSpeed ZeRO-3 (CPU, one process): the lm_head weight's gradient through amapo_loss_from_hidden, with the
weight gathered by deepspeed.zero.GatheredParameters or by the engine's hooks (an external parameter of the
model whose forward computes the loss), equals plain torch's. Runs in a subprocess so that DeepSpeed's
global state (process group, hooks, accelerator) does not leak into the other tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
"""ZeRO-3 (one CPU process): the lm_head gradient through amapo_loss_from_hidden equals plain torch's."""
import importlib, json, sys
import torch
from torch import nn
import deepspeed
from deepspeed.utils import safe_get_full_grad
from amapo_kernels.fused_linear import amapo_loss_from_hidden

VOCAB, WIDTH, PAIRS, STEPS = 37, 8, 2, 6
LOSS = dict(shift=True, beta=2.0, token_chunk=3, vocab_chunk=7)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, ids, labels=None):
        hidden = self.embed(ids)
        if labels is None:
            return hidden
        # the weight is read outside lm_head's own forward: ZeRO-3 gathers it as an external parameter
        return amapo_loss_from_hidden(hidden, self.lm_head.weight, labels, **LOSS)


def batch():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2 * PAIRS, STEPS), generator=generator)
    labels = ids.clone()
    labels[:, :2] = -100
    return ids, labels


def engine_for(state):
    model = Tiny()
    model.load_state_dict(state)
    config = {
        "train_micro_batch_size_per_gpu": 2 * PAIRS,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def main():
    # one process: the shared-memory all-reduce op (a ~20-60 s C++ build on first start) is never used
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in Tiny().state_dict().items()}
    ids, labels = batch()

    plain = Tiny()
    plain.load_state_dict(state)
    plain(ids, labels).backward()
    expected = plain.lm_head.weight.grad

    result = {}
    engine = engine_for(state)
    weight = engine.module.lm_head.weight
    result["partitioned"] = weight.numel() == 0  # ZeRO-3 holds only this rank's shard outside a gather

    # 1. gathered explicitly: GatheredParameters around forward and backward
    with deepspeed.zero.GatheredParameters([weight]):
        hidden = engine(ids)
        loss = amapo_loss_from_hidden(hidden, weight, labels, **LOSS)
        engine.backward(loss)
    grad = safe_get_full_grad(weight)
    result["gathered"] = (grad - expected).abs().max().item()

    # 2. gathered by the engine's hooks (a fresh engine): the loss inside the model's forward, the weight
    #    registered as an external parameter of the model
    engine = engine_for(state)
    weight = engine.module.lm_head.weight
    deepspeed.zero.register_external_parameter(engine.module, weight)
    loss = engine(ids, labels)
    engine.backward(loss)
    grad = safe_get_full_grad(weight)
    result["hooks"] = (grad - expected).abs().max().item()
    result["scale"] = expected.abs().max().item()
    # the hidden-state gradient reached the (also partitioned) embedding: the same in both
    result["embed"] = (safe_get_full_grad(engine.module.embed.weight) - plain.embed.weight.grad).abs().max().item()
    print("RESULT " + json.dumps(result), flush=True)
    # DeepSpeed leaves its gloo group alive; its worker threads, still running in the interpreter's teardown,
    # abort the process at times (SIGABRT, "terminate called without an active exception": torch's issue 190489)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
'''


def test_lm_head_grad_under_zero3(tmp_path):
    script = tmp_path / "zero3_check.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "CUDA_VISIBLE_DEVICES": "",
    }
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=85)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["partitioned"], "ZeRO-3 did not partition lm_head.weight: the test would prove nothing"
    assert result["scale"] > 0
    tolerance = 4 * 1.2e-7 * result["scale"]  # fp32 rounding at the gradient's scale
    assert result["gathered"] <= tolerance, result
    assert result["hooks"] <= tolerance, result
    assert result["embed"] <= tolerance, result


# ----------------------------------------------------------------------------------------------------------
# The paper recipes' own path through the driver: ZeRO-3 + the fused lm_head (issue 14: it crashed at step 1)
# ----------------------------------------------------------------------------------------------------------

RECIPE_ON_CPU = ["--recipe", "llama3-8b-base", "--model", "tiny", "--dataset", "bundled:hh-rlhf", "--train-split",
                 "train", "--test-split", "test", "--device", "cpu", "--max-train-pairs", "16", "--max-test-pairs",
                 "8", "--max-steps", "2", "--eval-steps", "2", "--log-with", "none"]


def run_recipe(tmp_path, name, processes, extra):
    """amapo-train with the llama3-8b-base recipe under DeepSpeed on the CPU (DS_ACCELERATOR=cpu, gloo):
    one process started as a user would on one GPU, with no launcher (the driver sets what one would: without
    it DeepSpeed looks for mpi4py), or torchrun; returns metrics.jsonl's records."""
    out = tmp_path / name
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = ["-m", "amapo_train.train", *RECIPE_ON_CPU, *extra, "--output-dir", str(out)]
    if processes == 1:
        for variable in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(variable, None)
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={free_port()}", *args]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name}: rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "accelerate: DEEPSPEED" in proc.stdout + proc.stderr
    assert f"{processes} process(es)" in proc.stdout + proc.stderr
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("processes", [1, 2])
def test_recipe_path_zero3_fused_equals_ops(tmp_path, processes):
    """The recipe's fused lm_head under ZeRO-3 (weight partitioned, gathered for forward and backward) trains,
    evaluates during training, and gives the losses of the op-from-logits path on the same batches. fp32
    (--bf16 false) so the comparison is tight: the two paths differ by fp32 rounding only. Two pairs a micro-batch
    over the processes: AMaPO's statistics over one pair are refused (test_cli)."""
    batch = ["--total-batch-size", str(2 * processes), "--per-device-batch-size", str(2 // processes),
             "--bf16", "false"]
    fused = run_recipe(tmp_path, "fused", processes, [*batch, "--loss-impl", "fused"])
    ops = run_recipe(tmp_path, "ops", processes, [*batch, "--loss-impl", "ops"])
    assert [r["step"] for r in fused] == [1, 2]
    for a, b in zip(fused, ops):
        # (rewards/margins, a difference of two rewards near -45, carries their fp32 rounding: compare the rewards)
        for key in ("loss", "rewards/chosen", "rewards/rejected", *(("eval_loss",) if a["step"] == 2 else ())):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
    assert "eval_ranking_accuracy/normalized" in fused[-1]


def test_a_mixture_of_experts_router_loss_under_zero3_on_two_processes(tmp_path):
    """A Mixtral (experts partitioned by ZeRO-3 over two processes) with --router-aux-loss-coef: the fused path's
    router load-balancing loss, from the decoder's router logits, equals the model's own (ops) on the same
    batches, and both train with it (aux_loss logged, and in the loss)."""
    from test_train import tiny_mixtral

    from amapo_train import model as models

    tokenizer = models.train_tiny_tokenizer(["Hello there.", "General Kenobi!"], vocab_size=300)
    tiny_mixtral(len(tokenizer), output_router_logits=False).save_pretrained(tmp_path / "mixtral")
    tokenizer.save_pretrained(tmp_path / "mixtral")
    moe = ["--model", str(tmp_path / "mixtral"), "--router-aux-loss-coef", "0.5", "--total-batch-size", "2",
           "--per-device-batch-size", "1", "--bf16", "false", "--max-length", "96", "--max-prompt-length", "48"]
    fused = run_recipe(tmp_path, "fused", 2, [*moe, "--loss-impl", "fused"])
    ops = run_recipe(tmp_path, "ops", 2, [*moe, "--loss-impl", "ops"])
    for a, b in zip(fused, ops, strict=True):
        assert a["aux_loss"] > 0 and a["aux_loss"] == pytest.approx(b["aux_loss"], rel=1e-5), a["step"]
        for key in ("loss", "rewards/chosen", *(("eval_loss", "eval_aux_loss") if a["step"] == 2 else ())):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)


@pytest.mark.parametrize("processes", [1, 2])
def test_alpha_dpo_running_statistics_resume_under_zero3(tmp_path, processes):
    """alpha_dpo's running statistics (decay > 0) under the recipe's ZeRO-3 (on 2 processes, over the pairs of
    both): accelerate saves the registered state beside DeepSpeed's checkpoint, so a run stopped after step 3 and
    resumed has the uninterrupted run's losses."""
    extra = ["--max-train-pairs", "32", "--max-steps", "5", "--eval-steps", "0", "--total-batch-size", "4",
             "--per-device-batch-size", "2", "--bf16", "false", "--warmup-ratio", "0", "--loss", "alpha_dpo",
             "--hparam", "beta=10", "--hparam", "alpha=1", "--hparam", "decay=0.9"]
    straight = run_recipe(tmp_path, "straight", processes, extra)
    run_recipe(tmp_path, "split", processes, [*extra, "--stop-after-steps", "3"])
    assert torch.load(tmp_path / "split" / "checkpoint-3" / "state" / "custom_checkpoint_1.pkl")["std"] > 0
    resumed = run_recipe(tmp_path, "split", processes, [*extra, "--resume", "last"])
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=1e-6)
