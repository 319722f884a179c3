"""DeepSpeed ZeRO-3 (CPU, one process): the lm_head weight's gradient through amapo_loss_from_hidden, with the
weight gathered by deepspeed.zero.GatheredParameters or by the engine's hooks (an external parameter of the
model whose forward computes the loss), equals plain torch's. Runs in a subprocess so that DeepSpeed's
global state (process group, hooks, accelerator) does not leak into the other tests."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
