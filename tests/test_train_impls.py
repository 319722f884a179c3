"""The driver's three loss paths (fused lm_head, op from logits, eager torch) train the same way."""

import json

import pytest
from helpers import free_port

from amapo_train.train import main

SHORT = ["--max-train-pairs", "32", "--max-test-pairs", "8", "--log-with", "none", "--device", "cpu",
         "--total-batch-size", "16", "--per-device-batch-size", "8", "--max-steps", "2"]


@pytest.mark.parametrize("loss", ["amapo", "dpo"])
def test_loss_impls_agree(tmp_path, loss):
    losses = {}
    for impl in ("fused", "ops", "eager"):
        out = tmp_path / impl
        main([*SHORT, "--loss", loss, "--loss-impl", impl, "--output-dir", str(out)])
        losses[impl] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    for impl in ("fused", "eager"):
        assert losses[impl] == pytest.approx(losses["ops"], rel=1e-4), impl


def tiny_gemma2(path):
    """A random 2-layer Gemma-2 (final_logit_softcapping=30) with the tiny tokenizer, its head scaled so that
    logits reach the softcap's range; saved for --model."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from amapo_train.data import load_records
    from amapo_train.model import train_tiny_tokenizer

    records = load_records("bundled:hh-rlhf", "train")
    tokenizer = train_tiny_tokenizer([r[side] for r in records for side in ("chosen", "rejected")])
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=512,
                          final_logit_softcapping=30.0, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_fused_applies_the_models_logit_softcap(tmp_path):
    """Gemma 2 softcaps its logits: the fused path applies the same softcap (before, it computed log-probs of
    the uncapped logits, a loss of 11.7 where ops and eager gave 5.4), and leaves out logits/*, whose mean
    would need every logit."""
    model = tiny_gemma2(tmp_path / "gemma2")
    metrics = {}
    for impl in ("fused", "ops"):
        out = tmp_path / impl
        main([*SHORT, "--model", str(model), "--loss-impl", impl, "--max-steps", "1", "--save-final", "off",
              "--output-dir", str(out)])
        metrics[impl] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    for name in ("loss", "logps/chosen", "logps/rejected"):
        assert metrics["fused"][name] == pytest.approx(metrics["ops"][name], rel=1e-4), name
    assert "logits/chosen" in metrics["ops"] and "logits/chosen" not in metrics["fused"]


def test_dpo_reference_is_the_policy_at_step_one_under_bf16(tmp_path):
    """The reference log-probs come from the policy's own path: under bf16 the fused policy (fp32 tiles) against
    an ops reference (bf16 logits) gave DPO rewards and a loss other than log 2 at the first step."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"  # its own process: accelerate's mixed precision is set once per process
    command = [sys.executable, "-m", "amapo_train.train", *SHORT, "--loss", "dpo", "--loss-impl", "fused", "--bf16",
               "on", "--max-steps", "1", "--save-final", "off", "--output-dir", str(out)]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rewards/margins"] == 0.0 and first["loss"] == pytest.approx(0.6931471805599453, abs=1e-7)


def test_fused_under_a_one_process_launcher(tmp_path):
    """torchrun --nproc_per_node 1 (RANK=0, WORLD_SIZE=1): accelerate wraps the model in DDP, and the fused
    path, which calls the decoder and the head itself, once failed there ("'DistributedDataParallel' object
    has no attribute 'get_decoder'"). It now trains as the same run without a launcher."""
    import os
    import subprocess
    import sys

    port = free_port()
    launched = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port)}
    losses = {}
    for name, extra_env in (("launched", launched), ("plain", {})):
        out = tmp_path / name
        command = [sys.executable, "-m", "amapo_train.train", *SHORT, "--loss-impl", "fused", "--save-final", "off",
                   "--output-dir", str(out)]
        done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1", **extra_env}, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        losses[name] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["plain"]) == 2
    assert losses["launched"] == pytest.approx(losses["plain"], rel=1e-6)
