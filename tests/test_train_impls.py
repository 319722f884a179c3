"""The driver's three loss paths (fused lm_head, op from logits, eager torch) train the same way."""

import json

import pytest

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
