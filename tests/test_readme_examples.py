"""The README's usage examples ("Use", "Drop-in for a TRL-style loss", "From hidden states") run as written,
in order, on a tiny Llama on the CPU: each block marked `<!-- test: tests/test_readme_examples.py -->`, with
the names it takes as given (a model, a concatenated batch, log-probs) defined here."""

import math
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from amapo_train.model import tiny_llama

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- test: tests/test_readme_examples.py -->"


def marked_blocks() -> list[str]:
    return re.findall(re.escape(MARKER) + r"\s*```python\n(.*?)```", README.read_text(), re.S)


def given(pairs: int = 2, steps: int = 12, vocab: int = 40) -> dict:
    """What the examples take as given: a model, a concatenated batch (chosen rows first, a prompt of 4 tokens
    ignored), its logits and labels, and per-pair log-probs of a policy and a reference."""
    generator = torch.Generator().manual_seed(0)
    model = tiny_llama(vocab)
    concat_ids = torch.randint(0, vocab, (2 * pairs, steps), generator=generator)
    concat_labels = concat_ids.clone()
    concat_labels[:, :4] = -100
    pair_logps = {name: -10 * torch.rand(pairs, generator=generator, dtype=torch.float32)
                  for name in ("chosen_logps", "rejected_logps", "policy_chosen", "policy_rejected", "ref_chosen",
                               "ref_rejected", "rc", "rr")}
    concat_mask = torch.ones_like(concat_ids)
    logits = model(input_ids=concat_ids, attention_mask=concat_mask).logits
    return {"torch": torch, "F": F, "model": model, "concat_ids": concat_ids, "concat_mask": concat_mask,
            "concat_labels": concat_labels, "logits": logits, "labels": concat_labels, "B": pairs, "beta": 2.0,
            "gamma": 1.0, **pair_logps}


def test_readme_usage_examples_run_as_written():
    blocks = marked_blocks()
    assert len(blocks) == 3, f"expected the three usage blocks marked {MARKER!r}, found {len(blocks)}"
    namespace = given()
    for index, block in enumerate(blocks):
        exec(compile(block, f"README.md (usage block {index + 1})", "exec"), namespace)
        loss = namespace["loss"]
        assert loss.dim() == 0 and math.isfinite(loss.item()), (index, loss)
    # the last block's losses come from hidden states: its gradient reaches the model's body and lm_head
    namespace["model"].zero_grad()
    namespace["loss"].backward()
    model = namespace["model"]
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert namespace["logps"].shape == (4,) and torch.isfinite(namespace["logps"]).all()


def test_readme_running_statistics_example_runs_as_written():
    """The Baselines section's alpha-DPO block: the training call updates the state, the frozen one reads it."""
    marker = "<!-- test: tests/test_readme_examples.py (running statistics) -->"
    (block,) = re.findall(re.escape(marker) + r"\s*```python\n(.*?)```", README.read_text(), re.S)
    namespace = {**given(pairs=3), "amapo_kernels": __import__("amapo_kernels")}
    exec(compile(block, "README.md (running statistics block)", "exec"), namespace)
    gap = namespace["chosen_logps"] - namespace["rejected_logps"] - (namespace["rc"] - namespace["rr"])
    expected = 0.1 * torch.stack([gap.double().mean(), gap.double().std()])  # one update from 0, not two
    torch.testing.assert_close(namespace["running"].mean_std, expected, rtol=1e-12, atol=0)
    assert math.isfinite(namespace["loss"].item()) and namespace["eval_loss"].item() == namespace["loss"].item()


def test_package_exports_the_compiled_ops_and_its_version():
    import tomllib

    import amapo_kernels

    namespace = {}
    exec("from amapo_kernels import *", namespace)
    assert {"ABLATIONS", "AMaPOLoss", "METHODS", "RunningStatistics", "VARIANTS", "amapo_loss",
            "amapo_loss_from_hidden", "amapo_loss_from_logits", "cpu_kernels", "has_cuda_kernels", "preference_loss",
            "preference_loss_from_hidden", "reference", "sequence_logps", "sequence_logps_from_hidden"} <= set(namespace)
    # the ops, not the fp64 reference of the same name (the demo compares the two)
    assert amapo_kernels.sequence_logps is sys.modules["amapo_kernels.sequence_logps"].sequence_logps
    assert amapo_kernels.preference_loss is not amapo_kernels.reference.preference_loss
    pyproject = tomllib.loads((README.parent / "pyproject.toml").read_text())
    assert amapo_kernels.__version__ == pyproject["project"]["version"]
