"""amapo_kernels.integrations.trl on CPU: a tiny random Llama and the bundled HH-RLHF pairs. PreferenceTrainer's
per-step loss equals this library's driver computation on the same token batches (AMaPO) and TRL's own
DPOTrainer's (DPO, also with a MoE's router loss); reference-free methods build no reference model; cached
reference log-probs are the method's; LoRA and prefix tuning train, prompt tuning is refused; every DPOTrainer
dataset format is accepted; AMaPO's statistics span two processes; the README's TRL script runs as written;
the example runner does what TRL's scripts/dpo.py does."""

import copy
import functools
import importlib.util
import math
import os
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port

pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from datasets import Dataset  # noqa: E402  (after the importorskip: TRL brings datasets)
import transformers  # noqa: E402
import trl.trainer.dpo_trainer as dpo_trainer  # noqa: E402
from transformers import (  # noqa: E402
    AyaVisionConfig, Gemma2Config, Gemma2ForCausalLM, PhiConfig, PhiForCausalLM, PreTrainedTokenizerFast)
from trl import DPOConfig, DPOTrainer  # noqa: E402

import amapo_kernels as ak  # noqa: E402
from amapo_kernels.integrations import hf_head  # noqa: E402
from amapo_kernels.integrations.hf_head import LOGIT_SCALES, fused_logit_softcap  # noqa: E402
from amapo_kernels.integrations.trl import PreferenceConfig, PreferenceTrainer  # noqa: E402
from amapo_kernels.preference import method_defaults  # noqa: E402
from amapo_train.data import load_records  # noqa: E402
from amapo_train.model import tiny_llama, train_tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAIRS = 24  # bundled training pairs used
TRAINING = dict(per_device_train_batch_size=4, learning_rate=1e-3, max_length=128, use_cpu=True, bf16=False,
                gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no", seed=0,
                dataset_num_proc=None, disable_tqdm=True)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    texts = [record[side] for record in load_records("bundled:hh-rlhf", "train") for side in ("chosen", "rejected")]
    return train_tiny_tokenizer(texts)


@pytest.fixture(scope="module")
def hh_pairs():
    """HH-RLHF as the bundled file holds it: 'chosen' / 'rejected' dialogues, the prompt implicit."""
    return Dataset.from_list(load_records("bundled:hh-rlhf", "train", PAIRS))


def recording(trainer_class):
    """trainer_class whose training steps record the parameters they start from, the batch and the loss."""

    class Recording(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            state = {k: v.detach().clone() for k, v in self.accelerator.unwrap_model(model).state_dict().items()}
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.steps.append({"state": state, "inputs": {k: v.detach().clone() for k, v in inputs.items()},
                               "loss": loss.item()})
            return loss

    Recording.steps = None
    return Recording


def make_trainer(trainer_class, config_class, tokenizer, dataset, tmp_path, *, model=None, **options):
    args = config_class(output_dir=str(tmp_path / "out"), **{**TRAINING, **options})
    trainer = trainer_class(model=model if model is not None else tiny_llama(len(tokenizer)), args=args,
                            train_dataset=dataset, processing_class=tokenizer)
    trainer.steps = []
    return trainer


def trained(trainer):
    trainer.train()
    assert trainer.steps and all(math.isfinite(step["loss"]) for step in trainer.steps)
    return trainer


# ----------------------------------------------------------------------------------------------------
# The same loss as this library's driver and as TRL's DPOTrainer
# ----------------------------------------------------------------------------------------------------


def driver_batch(inputs):
    """TRL's concatenated batch (chosen rows first, completion_mask) in the driver's batch format."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = ids.masked_fill(inputs["completion_mask"] == 0, -100)
    pairs = ids.shape[0] // 2
    batch = {"index": torch.arange(pairs)}
    for side, rows in (("chosen", slice(0, pairs)), ("rejected", slice(pairs, None))):
        batch.update({f"{side}_input_ids": ids[rows], f"{side}_attention_mask": mask[rows],
                      f"{side}_labels": labels[rows]})
    return batch


def driver_loss(model, inputs, method, hparams) -> float:
    """The loss amapo-train computes for this token batch (its pair_loss, from the logits through the op); if
    the driver's functions have moved, the library calls it makes."""
    try:
        from amapo_train.config import TrainConfig
        from amapo_train.train import pair_loss
    except ImportError:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        labels = ids.masked_fill(inputs["completion_mask"] == 0, -100)
        logps = ak.sequence_logps(model(input_ids=ids, attention_mask=mask).logits, labels, shift=True,
                                  average=True)
        chosen, rejected = logps.chunk(2)
        return ak.preference_loss(chosen, rejected, method=method, **hparams).item()
    config = TrainConfig(loss=method, loss_impl="ops", hparams=dict(hparams))
    loss, _ = pair_loss(model, driver_batch(inputs), config, None)
    return loss.item()


@pytest.mark.parametrize("loss_impl", ["fused", "ops"])
def test_amapo_steps_equal_the_driver(tokenizer, hh_pairs, tmp_path, loss_impl):
    trainer = trained(make_trainer(recording(PreferenceTrainer), PreferenceConfig, tokenizer, hh_pairs, tmp_path,
                                   loss="amapo", loss_hparams={"beta": 2.5}, loss_impl=loss_impl, max_steps=3))
    assert trainer.ref_model is None
    model = tiny_llama(len(tokenizer))
    for step in trainer.steps:
        model.load_state_dict(step["state"])
        expected = driver_loss(model, step["inputs"], "amapo", {"beta": 2.5})
        assert abs(step["loss"] - expected) <= TOLERANCE, (step["loss"], expected)
    first, last = trainer.steps[0]["state"], trainer.steps[-1]["state"]
    assert any(not torch.equal(first[k], last[k]) for k in first), "the model did not train"
    logged = trainer.state.log_history[0]
    for name in ("loss", "rewards/chosen", "rewards/accuracies", "logps/chosen", "num_tokens",
                 "batch_margin_mean", "batch_margin_std", "adaptive_margin"):
        assert name in logged, name
    inputs = trainer.steps[0]["inputs"]  # step 1's metrics: a reference-free reward is beta x the log-probs
    model.load_state_dict(trainer.steps[0]["state"])
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    for side, logps in zip(("chosen", "rejected"), ak.sequence_logps(logits, labels, shift=True).chunk(2)):
        assert logged[f"logps/{side}"] == pytest.approx(logps.mean().item(), rel=1e-6), side
        assert logged[f"rewards/{side}"] == pytest.approx(2.5 * logps.mean().item(), rel=1e-6), side


@pytest.mark.parametrize("loss_impl", ["fused", "ops"])
def test_gradient_checkpointing_trains_as_without(tokenizer, hh_pairs, tmp_path, loss_impl):
    """The paper's recipes train with gradient checkpointing (the decoder's layers recomputed in the backward, the
    fused head after them): the per-step losses equal a run without it (steps 2 and 3 depend on the gradients of
    the steps before)."""
    losses = {}
    for checkpointing in (False, True):
        trainer = trained(make_trainer(recording(PreferenceTrainer), PreferenceConfig, tokenizer, hh_pairs,
                                       tmp_path / str(checkpointing), loss="amapo", loss_impl=loss_impl, max_steps=3,
                                       gradient_checkpointing=checkpointing))
        assert trainer.model.is_gradient_checkpointing == checkpointing
        losses[checkpointing] = [step["loss"] for step in trainer.steps]
    assert losses[True] == pytest.approx(losses[False], abs=TOLERANCE)


@pytest.mark.parametrize("loss_impl", ["fused", "ops"])
def test_torch_compile_trains_as_without(tokenizer, hh_pairs, tmp_path, loss_impl):
    """`torch_compile=True` (the Trainer compiles the model, whose forward holds the fused head or returns the
    logits for the ops): the per-step losses equal an eager run's (steps 2 and 3 depend on the gradients of the
    steps before), and the model compiles without a graph break (one before, in the fused path: its lm_head
    method bound inside the forward)."""
    losses = {}
    torch._dynamo.utils.counters.clear()  # counts this test's compiled frames only
    for compiled in (False, True):
        trainer = trained(make_trainer(recording(PreferenceTrainer), PreferenceConfig, tokenizer, hh_pairs,
                                       tmp_path / str(compiled), loss="amapo", loss_impl=loss_impl, max_steps=3,
                                       torch_compile=compiled))
        assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule) == compiled
        losses[compiled] = [step["loss"] for step in trainer.steps]
    assert torch._dynamo.utils.counters["frames"]["ok"] > 0, "nothing was compiled: proves nothing"
    assert not torch._dynamo.utils.counters["graph_break"]  # the fused head's method is bound before compiling
    assert losses[True] == pytest.approx(losses[False], abs=TOLERANCE)


def test_dpo_steps_equal_trl_dpo(tokenizer, hh_pairs, tmp_path):
    ours = trained(make_trainer(recording(PreferenceTrainer), PreferenceConfig, tokenizer, hh_pairs,
                                tmp_path / "ours", loss="dpo", beta=0.1, max_steps=3))
    theirs = trained(make_trainer(recording(DPOTrainer), DPOConfig, tokenizer, hh_pairs, tmp_path / "trl",
                                  loss_type=["sigmoid"], beta=0.1, precompute_ref_log_probs=True, max_steps=3))
    assert len(ours.steps) == len(theirs.steps) == 3
    for mine, trl_step in zip(ours.steps, theirs.steps):
        assert torch.equal(mine["inputs"]["input_ids"], trl_step["inputs"]["input_ids"]), "not the same batches"
        assert abs(mine["loss"] - trl_step["loss"]) <= TOLERANCE, (mine["loss"], trl_step["loss"])
    assert abs(ours.steps[0]["loss"] - math.log(2)) <= TOLERANCE  # policy == reference before the first update
    assert abs(ours.steps[-1]["loss"] - math.log(2)) > 10 * TOLERANCE  # later steps are a real comparison


DPO_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "num_tokens")


@pytest.mark.parametrize("reference", ["ref_model", "lora"])
def test_live_reference_and_metrics_equal_trl_dpo(tokenizer, hh_pairs, tmp_path, reference):
    """precompute_ref_log_probs=False: the reference log-probs come live from the reference model passed in, or
    from the policy with its LoRA adapter disabled; each step's loss and every metric both trainers log equal TRL's
    DPOTrainer's (step 1: policy == reference, so the rewards are 0 and no pair is counted accurate), and so do
    the metrics of an evaluation after training."""
    runs = {}
    for name, trainer_class, config_class, options in (
            ("ours", PreferenceTrainer, PreferenceConfig, dict(loss="dpo")),
            ("trl", DPOTrainer, DPOConfig, dict(loss_type=["sigmoid"]))):
        args = config_class(output_dir=str(tmp_path / name), beta=0.1, max_steps=3, precompute_ref_log_probs=False,
                            **{**TRAINING, "learning_rate": 1e-2}, **options)
        models = dict(model=tiny_llama(len(tokenizer)))
        if reference == "ref_model":
            models["ref_model"] = tiny_llama(len(tokenizer))  # the policy's initial weights, another instance
        else:
            models["peft_config"] = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    task_type="CAUSAL_LM")
        trainer = recording(trainer_class)(args=args, train_dataset=hh_pairs, eval_dataset=hh_pairs.select(range(8)),
                                           processing_class=tokenizer, **models)
        trainer.steps = []
        runs[name] = trained(trainer)
        assert (trainer.ref_model is None) == (reference == "lora")
    ours, theirs = runs["ours"], runs["trl"]
    for mine, trl_step in zip(ours.steps, theirs.steps, strict=True):
        assert torch.equal(mine["inputs"]["input_ids"], trl_step["inputs"]["input_ids"]), "not the same batches"
        assert abs(mine["loss"] - trl_step["loss"]) <= TOLERANCE, (mine["loss"], trl_step["loss"])
    assert abs(ours.steps[-1]["loss"] - math.log(2)) > 10 * TOLERANCE  # the reference is not the current policy
    logs = [[entry for entry in trainer.state.log_history if "rewards/chosen" in entry] for trainer in runs.values()]
    assert len(logs[0]) == len(logs[1]) == 3
    for step, (mine, trl_log) in enumerate(zip(*logs)):
        for name in DPO_METRICS:
            assert mine[name] == pytest.approx(trl_log[name], rel=1e-6, abs=TOLERANCE), (step, name)
    assert logs[0][0]["rewards/chosen"] == logs[0][0]["rewards/accuracies"] == 0.0
    assert min(abs(log["rewards/margins"]) for log in logs[0][1:]) > 10 * TOLERANCE  # later steps compare rewards
    mine, trl_metrics = (trainer.evaluate() for trainer in runs.values())  # eval metrics: eval_ names, own lists
    for name in DPO_METRICS:
        assert mine[f"eval_{name}"] == pytest.approx(trl_metrics[f"eval_{name}"], rel=1e-6, abs=TOLERANCE), name


def tiny_mixtral(vocab_size):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False))


def test_moe_router_aux_loss_as_trl_dpo(tokenizer, hh_pairs, tmp_path):
    """A Mixtral's router load-balancing loss, x router_aux_loss_coef, is in the loss (step 2: in its gradient
    too) and logged as aux_loss, on both paths, as in TRL's DPOTrainer."""
    options = dict(beta=0.1, router_aux_loss_coef=0.5, max_steps=2)
    theirs = trained(make_trainer(recording(DPOTrainer), DPOConfig, tokenizer, hh_pairs, tmp_path / "trl",
                                  model=tiny_mixtral(len(tokenizer)), loss_type=["sigmoid"],
                                  precompute_ref_log_probs=True, **options))
    assert theirs.aux_loss_enabled and theirs.state.log_history[0]["aux_loss"] > 0
    for loss_impl in ("fused", "ops"):
        ours = trained(make_trainer(recording(PreferenceTrainer), PreferenceConfig, tokenizer, hh_pairs,
                                    tmp_path / loss_impl, model=tiny_mixtral(len(tokenizer)), loss="dpo",
                                    loss_impl=loss_impl, **options))
        for mine, trl_step in zip(ours.steps, theirs.steps, strict=True):
            assert abs(mine["loss"] - trl_step["loss"]) <= TOLERANCE, (loss_impl, mine["loss"], trl_step["loss"])
        for mine, trl_log in zip(ours.state.log_history[:2], theirs.state.log_history[:2], strict=True):
            assert mine["aux_loss"] == pytest.approx(trl_log["aux_loss"], abs=TOLERANCE), loss_impl


def tiny_phimoe(vocab_size):
    """Phi-3.5-MoE's family: its config names the experts num_local_experts (no num_experts alias); the model's
    forward passes its own num_experts / num_experts_per_tok to the load-balancing loss."""
    torch.manual_seed(0)
    return transformers.PhimoeForCausalLM(transformers.PhimoeConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2))


def test_moe_router_aux_loss_of_a_config_without_num_experts(tokenizer, hh_pairs, tmp_path):
    """PhiMoE (also DBRX, JetMoE, GraniteMoE): the config has no `num_experts`, and its router loss is on by
    default (router_aux_loss_coef=0.001). loss_impl='fused' (the default) raised AttributeError at the first
    training step; it now trains with the loss and the aux_loss of 'ops' (the model's own forward)."""
    runs = {}
    for loss_impl in ("ops", "fused"):
        runs[loss_impl] = trained(make_trainer(recording(PreferenceTrainer), PreferenceConfig, tokenizer, hh_pairs,
                                               tmp_path / loss_impl, model=tiny_phimoe(len(tokenizer)), loss="simpo",
                                               loss_impl=loss_impl, max_steps=1, max_length=64))
    ops, fused = runs["ops"], runs["fused"]
    assert fused.aux_loss_enabled and ops.state.log_history[0]["aux_loss"] > 0
    assert abs(fused.steps[0]["loss"] - ops.steps[0]["loss"]) <= TOLERANCE
    assert fused.state.log_history[0]["aux_loss"] == pytest.approx(ops.state.log_history[0]["aux_loss"],
                                                                   abs=TOLERANCE)


def tiny_gemma2_softcapped(vocab_size):
    """Gemma 2 (final_logit_softcapping=30), its head scaled so that logits reach the softcap's range."""
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=16, final_logit_softcapping=30.0, tie_word_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)
    return model


def tiny_phi_with_head_bias(vocab_size):
    """Phi: an untied lm_head with a bias (initialized to zero, so made random: a bias left out would show)."""
    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4))
    with torch.no_grad():
        model.lm_head.bias.normal_(0.0, 2.0)
    return model


def tiny_xlstm_softcapped(vocab_size):
    """xLSTM: its own name for the final softcap (output_logit_soft_cap, 30 by default), its head scaled so that
    logits reach the softcap's range; its chunkwise kernel takes sequences padded to a multiple of 64."""
    torch.manual_seed(0)
    model = transformers.xLSTMForCausalLM(transformers.xLSTMConfig(
        vocab_size=vocab_size, hidden_size=64, embedding_dim=64, num_heads=4, num_blocks=2, qk_dim_factor=0.5,
        v_dim_factor=1.0, output_logit_soft_cap=30.0, mode="train", chunkwise_kernel="chunkwise--native_autograd",
        sequence_kernel="native_sequence__native", step_kernel="native"))
    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)
    return model


tiny_xlstm_softcapped.options = {"pad_to_multiple_of": 64}


@pytest.mark.parametrize("make_model", [tiny_gemma2_softcapped, tiny_phi_with_head_bias, tiny_xlstm_softcapped])
def test_fused_logps_are_the_models_logits(tokenizer, hh_pairs, tmp_path, make_model):
    """loss_impl='fused' computes the log-probs of the logits the model's own forward returns (Gemma 2's and
    xLSTM's final logit softcaps applied, Phi's lm_head bias added): DPO's summed log-probs equal an fp64
    log-softmax of them."""
    trainer = make_trainer(PreferenceTrainer, PreferenceConfig, tokenizer, hh_pairs, tmp_path,
                           model=make_model(len(tokenizer)), loss="dpo", max_steps=1,
                           **getattr(make_model, "options", {}))
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    fused = torch.cat(trainer.compute_ref_log_probs(trainer.model, inputs))
    with torch.no_grad():  # without preference_labels the forward is the model's own
        logits = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
    token_logps = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, labels.clamp(min=0)[..., None])
    expected = (token_logps.squeeze(-1) * (labels != -100)).sum(-1)
    torch.testing.assert_close(fused.double(), expected, rtol=1e-6, atol=0.0)
    if make_model in (tiny_gemma2_softcapped, tiny_xlstm_softcapped):
        assert logits.abs().max() > 15.0, "logits below the softcap's range: it would prove nothing"


def tiny_modernbert_decoder(vocab_size):
    """ModernBERT-decoder (the Ettin decoders): logits = decoder(lm_head(h)), lm_head a prediction head (dense,
    activation, norm) before the output embeddings."""
    torch.manual_seed(0)
    return transformers.ModernBertDecoderForCausalLM(transformers.ModernBertDecoderConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        pad_token_id=0))


def tiny_llama4_text(vocab_size):
    """Llama 4's text model: base_model_prefix 'language_model' names no attribute, so base_model is the model."""
    torch.manual_seed(0)
    return transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, num_local_experts=2))



def test_fused_head_follows_a_replaced_lm_head(tokenizer):
    """A head that replaces the patched one after _add_sequence_logps_head (resize_token_embeddings builds a new
    lm_head) is the one the fused path multiplies by: its log-probs are those of the model's own logits."""
    from amapo_kernels.integrations.trl import _add_sequence_logps_head

    model = tiny_llama(len(tokenizer))
    _add_sequence_logps_head(model)
    head = model.get_output_embeddings()
    model.resize_token_embeddings(len(tokenizer) + 8)
    assert model.get_output_embeddings() is not head
    ids = torch.randint(0, len(tokenizer) + 8, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.arange(12) < 4, -100)
    fused, _ = model(input_ids=ids, preference_labels=labels)
    expected = ak.sequence_logps(model(input_ids=ids).logits, labels, shift=True, average=False)
    assert fused.detach() == pytest.approx(expected.detach(), abs=TOLERANCE)


def test_a_deep_copy_of_a_patched_model_computes_with_its_own_weights(tokenizer):
    """copy.deepcopy of a model with the fused head (a user's copy of trainer.model, an EMA or reference copy):
    the copy's forward, with and without preference_labels, uses the copy's weights (without them it ran the
    original's forward before: its weights, silently)."""
    import copy

    from amapo_kernels.integrations.trl import _add_sequence_logps_head

    model = tiny_llama(len(tokenizer))
    _add_sequence_logps_head(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.mul_(0.5)
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.arange(12) < 4, -100)
    with torch.no_grad():
        logits = twin(input_ids=ids).logits
        assert not torch.allclose(logits, model(input_ids=ids).logits, atol=1e-3)
        assert torch.equal(logits, transformers.LlamaForCausalLM.forward(twin, input_ids=ids).logits)
        fused, _ = twin(input_ids=ids, preference_labels=labels)
    assert fused == pytest.approx(ak.sequence_logps(logits, labels, shift=True, average=False), abs=TOLERANCE)


@pytest.mark.parametrize("make_model, message", [
    (tiny_modernbert_decoder, "also applies its 'lm_head' (ModernBertDecoderPredictionHead); use 'ops'"),
    (tiny_llama4_text, "which Llama4ForCausalLM does not have (base_model_prefix='language_model'); use 'ops'")])
def test_fused_refuses_a_head_it_would_not_compute(tokenizer, hh_pairs, tmp_path, make_model, message):
    """A module with weights between the decoder and the output embeddings (ModernBERT-decoder's prediction head:
    the fused log-probs were 0.1 nats per token off the model's own, silently), or no decoder module to run:
    loss_impl='fused' refuses the model, naming the option; 'ops' (the model's own logits) trains."""
    with pytest.raises(ValueError, match=f"^loss_impl 'fused' .*{re.escape(message)}"):
        make_trainer(PreferenceTrainer, PreferenceConfig, tokenizer, hh_pairs, tmp_path,
                     model=make_model(len(tokenizer)), loss="simpo", max_steps=1, router_aux_loss_coef=0.0)
    trained(make_trainer(recording(PreferenceTrainer), PreferenceConfig, tokenizer, hh_pairs, tmp_path / "ops",
                         model=make_model(len(tokenizer)), loss="simpo", loss_impl="ops", max_steps=1,
                         router_aux_loss_coef=0.0))


@pytest.mark.parametrize("model_class, scale", [("Granite", "logits_scaling"), ("Cohere", "logit_scale")])
def test_fused_refuses_a_logit_scaling(tokenizer, hh_pairs, tmp_path, model_class, scale, monkeypatch):
    """A model that scales its logits after the lm_head (Granite divides by logits_scaling, Cohere multiplies by
    logit_scale), which the fused head would leave out: loss_impl='fused' refuses it, naming the option, before
    the datasets are tokenized (and the reference log-probs computed); 'ops' (the model's own logits) trains; a
    scale of 1 is no scaling and the fused path takes it."""
    def model(value):
        config = getattr(transformers, f"{model_class}Config")(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, **{scale: value})
        torch.manual_seed(0)
        return getattr(transformers, f"{model_class}ForCausalLM")(config)

    with monkeypatch.context() as patched:
        patched.setattr(DPOTrainer, "_prepare_dataset", lambda *args, **kwargs: pytest.fail("tokenized first"))
        with pytest.raises(ValueError, match=f"loss_impl 'fused' does not apply the model's {scale}=0.25; use 'ops'"):
            make_trainer(PreferenceTrainer, PreferenceConfig, tokenizer, hh_pairs, tmp_path, model=model(0.25),
                         loss="dpo", max_steps=1)
    for loss_impl, value in (("ops", 0.25), ("fused", 1.0)):
        trained(make_trainer(recording(PreferenceTrainer), PreferenceConfig, tokenizer, hh_pairs,
                             tmp_path / loss_impl, model=model(value), loss="simpo", loss_impl=loss_impl, max_steps=1))


def test_hf_head_reads_the_text_config_through_wrappers():
    """The softcap and the scales are read from the language model's config: a multimodal config's text_config
    (Aya Vision's Cohere 2 logit_scale, absent from the outer config, is refused), and through a training
    wrapper's .module (DeepSpeed's engine, whose own .config is DeepSpeed's)."""
    aya = SimpleNamespace(config=AyaVisionConfig(text_config={"model_type": "cohere2", "logit_scale": 0.25}))
    with pytest.raises(ValueError, match="loss_impl 'fused' does not apply the model's logit_scale=0.25"):
        fused_logit_softcap(aya, "loss_impl")
    engine = SimpleNamespace(module=SimpleNamespace(config=Gemma2Config(final_logit_softcapping=30.0)),
                             config={"zero_optimization": {"stage": 3}})
    assert fused_logit_softcap(engine, "loss_impl") == 30.0


def test_fused_head_softcap_of_a_model():
    """integrations.hf_head.fused_logit_softcap, which the TRL integration and amapo-train pass as logit_softcap:
    the model's final_logit_softcapping (Gemma 2), also through a training wrapper's .module, None without one,
    and a ValueError naming the caller's switch for a config that scales its logits (the fused path would
    compute log-probs of other logits than the model's). Stand-ins for a model: it reads only its config."""
    def model(**config):
        text_config = SimpleNamespace(**config)
        return SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: text_config))

    assert fused_logit_softcap(model(final_logit_softcapping=30.0), "--loss-impl") == 30.0
    assert fused_logit_softcap(SimpleNamespace(module=model(final_logit_softcapping=30.0)), "--loss-impl") == 30.0
    assert fused_logit_softcap(model(logit_scale=1.0, output_multiplier=None), "--loss-impl") is None
    for name in LOGIT_SCALES:
        for wrapped in (False, True):
            scaled = model(**{name: 0.5}, final_logit_softcapping=30.0)
            with pytest.raises(ValueError, match=re.escape(f"loss_impl 'fused' does not apply the model's {name}=0.5")):
                fused_logit_softcap(SimpleNamespace(module=scaled) if wrapped else scaled, "loss_impl")


def test_fused_head_of_models_that_name_or_skip_their_transforms_otherwise():
    """RecurrentGemma's softcap is logits_soft_cap (the fused path ignored it: log-probs of uncapped logits);
    Gemma 3's multimodal model keeps final_logit_softcapping in its text config but applies none (its fused
    log-probs were of capped logits); MPT's forward ignores its config's logit_scale (refused before); ProphetNet
    takes its logits from its n-gram stream, not the decoder's last hidden states (its fused log-probs were of
    other logits): refused, naming the option."""
    torch.manual_seed(0)
    recurrent = transformers.RecurrentGemmaForCausalLM(transformers.RecurrentGemmaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, lru_width=32, attention_window_size=8, logits_soft_cap=3.0))
    assert fused_logit_softcap(recurrent, "loss_impl") == 3.0
    text_config = SimpleNamespace(final_logit_softcapping=30.0)
    gemma3 = type("Gemma3ForConditionalGeneration", (), {})()
    gemma3.config = SimpleNamespace(get_text_config=lambda: text_config)
    assert fused_logit_softcap(gemma3, "loss_impl") is None
    mpt = transformers.MptForCausalLM(transformers.MptConfig(vocab_size=64, d_model=32, n_heads=2, n_layers=1,
                                                             logit_scale=0.5))
    assert fused_logit_softcap(mpt, "loss_impl") is None
    prophetnet = transformers.ProphetNetForCausalLM(transformers.ProphetNetConfig(
        vocab_size=64, hidden_size=16, encoder_ffn_dim=32, decoder_ffn_dim=32, num_encoder_layers=1,
        num_decoder_layers=1, num_encoder_attention_heads=2, num_decoder_attention_heads=2))
    with pytest.raises(ValueError, match="loss_impl 'fused' .* ProphetNetForCausalLM takes its logits from its "
                                         "n-gram predicting stream; use 'ops'"):
        fused_logit_softcap(prophetnet, "loss_impl")


def test_doges_router_loss_takes_its_number_of_keys():
    """Doge's load_balancing_loss_func takes num_keys before top_k: called as Mixtral's, the mask went in as
    top_k and the first fused step died in a TypeError. Its router loss is the model's own aux_loss."""
    from amapo_kernels.integrations.hf_head import router_loss_function

    torch.manual_seed(0)
    doge = transformers.DogeForCausalLM(transformers.DogeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, is_moe=True, num_experts=16, num_experts_per_tok=2))
    ids, mask = torch.randint(0, 64, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    outputs = doge(input_ids=ids, attention_mask=mask, output_router_logits=True)
    router_loss = router_loss_function(doge, "loss_impl", "use 'ops'")(outputs.router_logits, mask)
    torch.testing.assert_close(router_loss, outputs.aux_loss, rtol=0, atol=0)


def test_fused_head_refuses_inklings_hidden_scaling_and_truncated_vocabulary():
    """Inkling divides the hidden states by logits_mup_width_multiplier (24 by default) before its lm_head and
    keeps only the first unpadded_vocab_size logits: the fused path, which does neither, refuses each, naming
    it; with neither the model's logits are the lm_head's and it takes them. Stand-in configs, then the real
    one where this transformers has the model (its fused log-probs were 0.2 nats off the model's own)."""
    def model(**config):
        text_config = SimpleNamespace(vocab_size=97, **config)
        return SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: text_config))

    with pytest.raises(ValueError, match=re.escape("the model's logits_mup_width_multiplier=24.0; use 'ops'")):
        fused_logit_softcap(model(logits_mup_width_multiplier=24.0), "loss_impl")
    with pytest.raises(ValueError, match=re.escape("beyond the model's unpadded_vocab_size=90 (its lm_head has "
                                                   "vocab_size=97 rows); use 'ops'")):
        fused_logit_softcap(model(logits_mup_width_multiplier=1.0, unpadded_vocab_size=90), "--loss-impl")
    assert fused_logit_softcap(model(logits_mup_width_multiplier=1.0, unpadded_vocab_size=97), "loss_impl") is None
    inkling = pytest.importorskip("transformers.models.inkling.configuration_inkling")
    real = SimpleNamespace(config=inkling.InklingTextConfig(vocab_size=97))
    with pytest.raises(ValueError, match="logits_mup_width_multiplier=24.0"):
        fused_logit_softcap(real, "loss_impl")


# ----------------------------------------------------------------------------------------------------
# Reference models
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss, hparams", [("amapo", {}), ("simpo", {}), ("cpo", {}), ("slic", {"form": "rank"})])
def test_reference_free_builds_no_reference_model(tokenizer, hh_pairs, tmp_path, monkeypatch, loss, hparams):
    def no_model(*args, **kwargs):
        raise AssertionError("a reference-free loss loaded a model")

    monkeypatch.setattr(dpo_trainer, "create_model_from_path", no_model)
    trainer = make_trainer(PreferenceTrainer, PreferenceConfig, tokenizer, hh_pairs, tmp_path, loss=loss,
                           loss_hparams=hparams, max_steps=1)
    assert trainer.ref_model is None
    assert "ref_chosen_logps" not in trainer.train_dataset.column_names  # nothing precomputed either
    assert not trainer.precompute_ref_logps and trainer.args.precompute_ref_log_probs  # the user's flag kept
    with pytest.raises(ValueError, match="ref_model"):
        PreferenceTrainer(model=tiny_llama(len(tokenizer)), ref_model=tiny_llama(len(tokenizer)),
                          args=trainer.args, train_dataset=hh_pairs, processing_class=tokenizer)


def test_reference_free_with_precompute_off_builds_no_reference_model(tokenizer, hh_pairs, tmp_path, monkeypatch):
    """precompute_ref_log_probs=False (DPOTrainer's live reference) with a reference-free loss: still no reference
    model is loaded, and the user's flag is kept."""
    def no_model(*args, **kwargs):
        raise AssertionError("a reference-free loss loaded a model")

    monkeypatch.setattr(dpo_trainer, "create_model_from_path", no_model)
    trainer = make_trainer(PreferenceTrainer, PreferenceConfig, tokenizer, hh_pairs, tmp_path, loss="simpo",
                           precompute_ref_log_probs=False, max_steps=1)
    assert trainer.ref_model is None and not trainer.precompute_ref_logps
    assert not trainer.args.precompute_ref_log_probs


def test_reference_free_hashes_no_weights(tokenizer, hh_pairs, tmp_path, monkeypatch):
    """DPOTrainer hashes every weight (copied to the CPU) as the key of precomputed reference log-probs: seconds
    per billion parameters on every rank, wasted by a reference-free loss, which precomputes nothing."""
    hashed = []
    monkeypatch.setattr(dpo_trainer, "hash_module", lambda module: hashed.append(module) or "hash")
    for precompute in (True, False):
        make_trainer(PreferenceTrainer, PreferenceConfig, tokenizer, hh_pairs, tmp_path, loss="amapo",
                     precompute_ref_log_probs=precompute, max_steps=1)
    assert hashed == []
    trainer = make_trainer(PreferenceTrainer, PreferenceConfig, tokenizer, hh_pairs, tmp_path / "dpo", loss="dpo",
                           max_steps=1)  # the guard: a reference method's cache key is still TRL's hash
    assert hashed == [trainer.model]


def test_reference_methods_get_reference_logps(tokenizer, hh_pairs, tmp_path):
    """The guard of the test above: slic's hinge form needs a reference, so its log-probs are precomputed."""
    trainer = make_trainer(PreferenceTrainer, PreferenceConfig, tokenizer, hh_pairs, tmp_path, loss="slic",
                           loss_hparams={"form": "hinge"}, max_steps=1)
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    first = trainer.train_dataset[0]
    assert first["ref_chosen_logps"] < 0 and first["ref_rejected_logps"] < 0  # summed log-probs


def test_cached_reference_logps_are_the_methods(tokenizer, tmp_path):
    """TRL caches precomputed reference log-probs by dataset and weights: a cache of DPO's summed log-probs is
    not alpha_dpo's length-normalized ones (nor the other path's)."""
    import json

    from datasets import load_dataset

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in load_records("bundled:hh-rlhf", "train", 8)))
    values = {}
    for loss, loss_impl in (("dpo", "fused"), ("alpha_dpo", "fused"), ("alpha_dpo", "ops")):
        dataset = load_dataset("json", data_files=str(data), split="train", cache_dir=str(tmp_path / "cache"))
        # max_length=None: with a limit, TRL's length filter hashes the whole config into the dataset fingerprint
        trainer = make_trainer(PreferenceTrainer, PreferenceConfig, tokenizer, dataset, tmp_path / loss, loss=loss,
                               loss_impl=loss_impl, max_steps=1, max_length=None)
        cached = torch.tensor(trainer.train_dataset["ref_chosen_logps"][:4])
        fresh, _ = trainer.compute_ref_log_probs(trainer.model, trainer.data_collator(
            [trainer.train_dataset[i] for i in range(4)]))
        assert torch.equal(cached, fresh.float()), (loss, loss_impl, cached, fresh)
        values[loss, loss_impl] = cached
    assert not torch.allclose(values["dpo", "fused"], values["alpha_dpo", "fused"])  # sums vs means


@pytest.mark.parametrize("settings", [
    [dict(max_length=256, truncation_mode="keep_end"), dict(max_length=32, truncation_mode="keep_end")],
    [dict(max_length=None, bf16=True), dict(max_length=None, bf16=False)]])
def test_cached_reference_logps_are_of_this_runs_truncation_and_precision(tokenizer, tmp_path, settings):
    """The reference log-probs TRL caches depend on the collator's truncation (keep_end: max_length is in no
    dataset fingerprint) and on the autocast precision: a second run on the same data file with another
    max_length, or fp32 after bf16, reused the first run's values (long completions' log-probs of the untruncated
    sequences; bf16 values 2e-3 nats off)."""
    import json

    from datasets import load_dataset

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in load_records("bundled:hh-rlhf", "train", 8)))
    for index, options in enumerate(settings):
        dataset = load_dataset("json", data_files=str(data), split="train", cache_dir=str(tmp_path / "cache"))
        trainer = make_trainer(PreferenceTrainer, PreferenceConfig, tokenizer, dataset, tmp_path / str(index),
                               loss="dpo", max_steps=1, **options)
        cached = torch.tensor(trainer.train_dataset["ref_chosen_logps"][:4])
        fresh, _ = trainer.compute_ref_log_probs(trainer.model, trainer.data_collator(
            [trainer.train_dataset[i] for i in range(4)]))
        assert torch.equal(cached, fresh.float()), (options, cached, fresh)


# ----------------------------------------------------------------------------------------------------
# PEFT, dataset formats, configuration errors
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss, precompute", [("amapo", True), ("dpo", False)])
def test_lora_trains(tokenizer, hh_pairs, tmp_path, loss, precompute):
    """LoRA: only the adapters change; DPO's live reference is the policy with its adapter disabled."""
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = PreferenceConfig(output_dir=str(tmp_path), loss=loss, max_steps=3, precompute_ref_log_probs=precompute,
                            **TRAINING)
    trainer = recording(PreferenceTrainer)(model=tiny_llama(len(tokenizer)), args=args, train_dataset=hh_pairs,
                                           processing_class=tokenizer, peft_config=lora)
    trainer.steps = []
    trained(trainer)
    assert trainer.ref_model is None
    before, after = trainer.steps[0]["state"], trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)
    if loss == "dpo":  # the adapter's B starts at zero: policy == reference at the first step
        assert abs(trainer.steps[0]["loss"] - math.log(2)) <= TOLERANCE


def test_peft_virtual_token_adapters_raise(tokenizer, hh_pairs, tmp_path):
    """Prompt tuning and p-tuning prepend virtual tokens: an error naming peft_config before anything runs;
    prefix tuning (a KV prefix) trains, on both paths."""
    for adapter in (peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                    peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16)):
        args = PreferenceConfig(output_dir=str(tmp_path), loss="dpo", max_steps=1, **TRAINING)
        with pytest.raises(ValueError, match=f"peft_config: {adapter.peft_type.value}"):
            PreferenceTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=hh_pairs,
                              processing_class=tokenizer, peft_config=adapter)
    for loss_impl in ("fused", "ops"):
        args = PreferenceConfig(output_dir=str(tmp_path), loss="simpo", loss_impl=loss_impl, max_steps=1, **TRAINING)
        trainer = recording(PreferenceTrainer)(model=tiny_llama(len(tokenizer)), args=args, train_dataset=hh_pairs,
                                               processing_class=tokenizer,
                                               peft_config=peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                   num_virtual_tokens=4))
        trainer.steps = []
        trained(trainer)


def test_peft_model_passed_in_with_virtual_tokens_raises(tokenizer, hh_pairs, tmp_path):
    """A PeftModel passed in as the model (no peft_config) is checked too: prompt tuning is refused; a Cartridge
    (a KV prefix, as prefix tuning) is not."""
    args = PreferenceConfig(output_dir=str(tmp_path), loss="simpo", max_steps=1, **TRAINING)
    prompt_tuned = peft.get_peft_model(tiny_llama(len(tokenizer)),
                                       peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="peft_config: PROMPT_TUNING"):
        PreferenceTrainer(model=prompt_tuned, args=args, train_dataset=hh_pairs, processing_class=tokenizer)
    cartridge = peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    trainer = PreferenceTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=hh_pairs,
                                processing_class=tokenizer, peft_config=cartridge)
    assert trainer.model.peft_config["default"].peft_type.value == "CARTRIDGE"


def test_peft_adapter_on_the_lm_head_is_refused_by_fused(tokenizer, hh_pairs, tmp_path):
    """PEFT's trainable tokens on the lm_head add a delta in the head's forward that its weight leaves out: the
    fused path stopped on an AttributeError (the wrapper has no bias). Refused when the trainer is built, naming
    loss_impl; ops trains. LoRA on the lm_head (whose delta the fused path left out, silently: 4.75 nats off in a
    sequence, measured) is refused by TRL 1.16's own DPOTrainer on both paths, and by hf_head where that check
    does not run; so is a model without output embeddings."""
    tokens = peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=["q_proj"],
                             trainable_token_indices={"lm_head": [1, 2, 3]})
    for loss_impl in ("fused", "ops"):
        args = PreferenceConfig(output_dir=str(tmp_path), loss="simpo", loss_impl=loss_impl, max_steps=1, **TRAINING)
        build = functools.partial(recording(PreferenceTrainer), model=tiny_llama(len(tokenizer)), args=args,
                                  train_dataset=hh_pairs, processing_class=tokenizer, peft_config=tokens)
        if loss_impl == "fused":
            with pytest.raises(ValueError, match=r"loss_impl 'fused' .* output embeddings, a peft\..*"
                                                 r"TrainableTokensWrapper.* use 'ops'"):
                build()
        else:
            trainer = build()
            trainer.steps = []
            trained(trainer)
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=["q_proj", "lm_head"])
    for loss_impl in ("fused", "ops"):  # TRL's refusal, whatever the path
        args = PreferenceConfig(output_dir=str(tmp_path), loss="simpo", loss_impl=loss_impl, max_steps=1, **TRAINING)
        with pytest.raises(ValueError, match="Applying a PEFT adapter to `lm_head` is not supported"):
            PreferenceTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=hh_pairs,
                              processing_class=tokenizer, peft_config=lora_config)
    lora = peft.get_peft_model(tiny_llama(len(tokenizer)), lora_config)
    with pytest.raises(ValueError, match=r"loss_impl 'fused' .* output embeddings, a peft\.tuners\.lora"):
        fused_logit_softcap(lora.get_base_model(), "loss_impl")
    with pytest.raises(ValueError, match=r"--loss-impl 'fused' .* get_output_embeddings\(\) is None; use 'ops'"):
        hf_head._check_head_is_linear(None, "--loss-impl")


def lm_head_copy_config():
    """PEFT's LoRA on q_proj with a trained copy of the lm_head (modules_to_save), a fresh config each call."""
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"],
                           task_type="CAUSAL_LM")


def test_peft_modules_to_save_lm_head_fused_equals_ops(tokenizer, hh_pairs, tmp_path):
    """modules_to_save=["lm_head"] trains a copy of the head beside LoRA's adapters: the fused path reads the
    active copy's weight (the original one with the adapter disabled, DPO's live reference). Per-step losses
    equal the ops path's; from step 2 on the copy differs from the original, so both are read."""
    lora = lm_head_copy_config()
    losses = {}
    for loss_impl in ("fused", "ops"):
        args = PreferenceConfig(output_dir=str(tmp_path / loss_impl), loss="dpo", loss_impl=loss_impl, max_steps=3,
                                precompute_ref_log_probs=False, **TRAINING)
        trainer = recording(PreferenceTrainer)(model=tiny_llama(len(tokenizer)), args=args, train_dataset=hh_pairs,
                                               processing_class=tokenizer, peft_config=lora)
        trainer.steps = []
        losses[loss_impl] = [step["loss"] for step in trained(trainer).steps]
    head = trainer.model.get_base_model().get_output_embeddings()
    assert not torch.equal(head.modules_to_save["default"].weight, head.original_module.weight)
    assert abs(losses["ops"][0] - math.log(2)) <= TOLERANCE < abs(losses["ops"][2] - math.log(2))
    assert losses["fused"] == pytest.approx(losses["ops"], abs=TOLERANCE)


CHAT_TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}"
                 "{% if add_generation_prompt %}<|bos|>assistant:{% endif %}")


def dataset_formats():
    """The preference formats DPOTrainer accepts: standard or conversational, explicit or implicit prompt."""
    records = load_records("bundled:hh-rlhf", "train", 8)
    explicit = [{"prompt": "\n\nHuman: hello\n\nAssistant:", "chosen": r["chosen"][-80:],
                 "rejected": r["rejected"][-80:]} for r in records]
    user = [{"role": "user", "content": "What is a safe thing to do?"}]
    answers = [({"role": "assistant", "content": r["chosen"][-60:]}, {"role": "assistant", "content": r["rejected"][-60:]})
               for r in records]
    return {
        "standard implicit prompt": records,
        "standard explicit prompt": explicit,
        "conversational explicit prompt": [{"prompt": user, "chosen": [c], "rejected": [r]} for c, r in answers],
        "conversational implicit prompt": [{"chosen": [*user, c], "rejected": [*user, r]} for c, r in answers],
    }


@pytest.mark.parametrize("name", list(dataset_formats()))
def test_every_dpo_dataset_format(tokenizer, tmp_path, name):
    chat_tokenizer = tokenizer.__class__.from_pretrained(_saved(tokenizer, tmp_path / "tokenizer"))
    chat_tokenizer.chat_template = CHAT_TEMPLATE
    trainer = make_trainer(recording(PreferenceTrainer), PreferenceConfig, chat_tokenizer,
                           Dataset.from_list(dataset_formats()[name]), tmp_path, loss="simpo", max_steps=1)
    trained(trainer)
    assert trainer.steps[0]["inputs"]["completion_mask"].sum() > 0


def _saved(tokenizer, directory) -> str:
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_alpha_dpo_running_statistics_resume_and_survive_evaluation(tokenizer, hh_pairs, tmp_path):
    """alpha_dpo with decay > 0: the running statistics are in every checkpoint (trainer_state.json), so a run
    resumed from one (with or without restore_callback_states_from_checkpoint) has the uninterrupted run's losses;
    evaluation reads them without updating them; and they are used (decay = 0 trains otherwise)."""
    def losses(name, decay=0.9, resume=None, **options):
        args = PreferenceConfig(output_dir=str(tmp_path / name), **{**TRAINING, "save_strategy": "steps",
                                "save_steps": 2, "max_steps": 4, **options}, loss="alpha_dpo",
                                loss_hparams={"beta": 10.0, "alpha": 1.0, "decay": decay})
        trainer = recording(PreferenceTrainer)(model=tiny_llama(len(tokenizer)), args=args, train_dataset=hh_pairs,
                                               eval_dataset=hh_pairs.select(range(8)), processing_class=tokenizer)
        trainer.steps = []
        trainer.train(resume_from_checkpoint=resume)
        return [step["loss"] for step in trainer.steps]

    straight = losses("straight")
    # one-pair held-out batches too: the evaluation reads the running statistics, whatever its batch
    assert losses("evaluated", eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=1) == pytest.approx(
        straight, rel=1e-6)
    checkpoint = str(tmp_path / "straight" / "checkpoint-2")
    with warnings.catch_warnings():  # the state was there: no warning that it starts from 0
        warnings.filterwarnings("error", message="resumed at step")
        assert losses("resumed", resume=checkpoint) == pytest.approx(straight[2:], rel=1e-6)
    assert losses("restored", resume=checkpoint, restore_callback_states_from_checkpoint=True) == pytest.approx(
        straight[2:], rel=1e-6)
    stateless = losses("stateless", decay=0.0)
    assert all(abs(a - b) > 1e-3 for a, b in zip(stateless[2:], straight[2:])), (stateless, straight)
    with pytest.warns(UserWarning, match="resumed at step 2 from a checkpoint without running statistics"):
        losses("from stateless", resume=str(tmp_path / "stateless" / "checkpoint-2"))


def test_alpha_dpo_logs_the_rewards_of_its_implicit_reference(tokenizer, hh_pairs, tmp_path):
    """The logged rewards are alpha_dpo's own, beta ((1 - alpha) logp + alpha ref) (length-normalized), as the
    driver's (one function, preference.logged_rewards) and the official trainer's."""
    trainer = trained(make_trainer(recording(PreferenceTrainer), PreferenceConfig, tokenizer, hh_pairs, tmp_path,
                                   loss="alpha_dpo", loss_hparams={"beta": 2.0, "alpha": 0.25}, max_steps=1))
    inputs, logged = trainer.steps[0]["inputs"], trainer.state.log_history[0]
    model = tiny_llama(len(tokenizer))
    model.load_state_dict(trainer.steps[0]["state"])
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    for side, logps in zip(("chosen", "rejected"), ak.sequence_logps(logits, labels, shift=True).chunk(2)):
        expected = 2.0 * (0.75 * logps + 0.25 * inputs[f"ref_{side}_logps"].float())
        assert logged[f"rewards/{side}"] == pytest.approx(expected.mean().item(), rel=1e-5), side


def test_config_resolves_and_checks_hyperparameters(tmp_path):
    config = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    args = PreferenceConfig(**config)
    assert args.loss_hparams == {"beta": 2.0, "label_smoothing": 0.0, "variant": "code", "ablation": None}
    assert args.beta == 2.0
    args = PreferenceConfig(**config, loss="amapo", beta=3.0, amapo_variant="paper", amapo_ablation="no_exp")
    assert args.loss_hparams == {"beta": 3.0, "label_smoothing": 0.0, "variant": "paper", "ablation": "no_exp"}
    assert PreferenceConfig(**config, loss="ipo").beta is None  # no beta: rewards are the log-ratios, unscaled
    assert PreferenceConfig(**config, loss_hparams='{"beta": 2.5}').loss_hparams["beta"] == 2.5  # CLI JSON
    assert PreferenceConfig(**config, loss_hparams='{"beta": "2.5"}').loss_hparams["beta"] == 2.5  # as TRL's dicts
    with pytest.raises(ValueError, match="loss_hparams must be a JSON object"):
        PreferenceConfig(**config, loss_hparams="notjson")
    for not_a_dict in ("[1]", [1]):
        with pytest.raises(TypeError, match="loss_hparams must be a dict"):
            PreferenceConfig(**config, loss_hparams=not_a_dict)
    with pytest.raises(TypeError, match="loss_hparams.*gamma"):
        PreferenceConfig(**config, loss="dpo", loss_hparams={"gamma": 1.0})
    with pytest.raises(ValueError, match="beta=3.0 and loss_hparams"):
        PreferenceConfig(**config, beta=3.0, loss_hparams={"beta": 2.0})
    with pytest.raises(ValueError, match="amapo_variant"):
        PreferenceConfig(**config, loss="simpo", amapo_variant="paper")
    with pytest.raises(ValueError, match="variant"):
        PreferenceConfig(**config, amapo_variant="papr")
    with pytest.raises(ValueError, match="beta"):
        PreferenceConfig(**config, beta=-1.0)
    with pytest.raises(ValueError, match="loss_type"):
        PreferenceConfig(**config, loss_type=["hinge"])
    with pytest.raises(ValueError, match="loss_impl"):
        PreferenceConfig(**config, loss_impl="eager")
    with pytest.raises(ValueError, match="loss"):
        PreferenceConfig(**config, loss="orpo")
    with pytest.raises(ValueError, match="odpo.*scores"):
        PreferenceConfig(**config, loss="odpo")
    assert PreferenceConfig(**config, loss="alpha_dpo").loss_hparams["decay"] == 0.0
    # TRL's label_smoothing sets alpha-DPO's, as in its official trainer (a DPOTrainer)
    assert PreferenceConfig(**config, loss="alpha_dpo", label_smoothing=0.1).loss_hparams["label_smoothing"] == 0.1
    with pytest.raises(ValueError, match=r"decay must be a finite number in \[0.0, 1.0\), got 1.0"):
        PreferenceConfig(**config, loss="alpha_dpo", loss_hparams={"decay": 1.0})
    with pytest.raises(ValueError, match="sync_ref_model"):
        PreferenceConfig(**config, sync_ref_model=True)
    with pytest.raises(TypeError, match="PreferenceConfig"):
        PreferenceTrainer(model=tiny_llama(64), args=DPOConfig(**config), train_dataset=Dataset.from_list([]))


@pytest.mark.parametrize("loss, hparams", [("amapo", {}), ("dpo", {}), ("ipo", {"tau": 0.5}), ("slic", {}),
                                           ("slic", {"form": "hinge"})])
def test_config_builds_again_from_itself(tmp_path, loss, hparams):
    """A constructed PreferenceConfig is a valid input: dataclasses.replace (a sweep's copy) and a rebuild from its
    fields give the same config. A method without beta kept beta=1.0 after construction, which the constructor
    then refused ("beta=1.0 does not apply to loss='ipo'")."""
    import dataclasses

    args = PreferenceConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, loss=loss, loss_hparams=hparams)
    copy = dataclasses.replace(args, learning_rate=1e-5)
    assert (copy.loss_hparams, copy.beta, copy.learning_rate) == (args.loss_hparams, args.beta, 1e-5)
    rebuilt = PreferenceConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init})
    assert (rebuilt.loss_hparams, rebuilt.beta) == (args.loss_hparams, args.beta)


@pytest.mark.parametrize("change, message", [
    (lambda args: setattr(args, "beta", 0.5), r"beta=0.5 and loss_hparams\['beta'\]=2.0 disagree"),
    (lambda args: args.loss_hparams.update(beta=0.5), r"beta=2.0 and loss_hparams\['beta'\]=0.5 disagree"),
    (lambda args: setattr(args, "loss", "ipo"), r"loss='ipo' has no hyperparameter")])
def test_config_changed_after_construction_is_checked(tokenizer, hh_pairs, tmp_path, monkeypatch, change, message):
    """`args.beta = 0.5` between PreferenceConfig and PreferenceTrainer (as one does with a DPOConfig, whose
    DPOTrainer reads args.beta) trained with the beta of loss_hparams (2.0) while the rewards were logged x 0.5.
    A config changed after construction is checked again: an error naming both values, before tokenization."""
    def no_tokenization(*args, **kwargs):
        raise AssertionError("the dataset was tokenized before the error")

    monkeypatch.setattr(DPOTrainer, "_prepare_dataset", no_tokenization)
    args = PreferenceConfig(output_dir=str(tmp_path), loss="simpo", max_steps=1, **TRAINING)
    change(args)
    with pytest.raises((ValueError, TypeError), match=message):
        PreferenceTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=hh_pairs,
                          processing_class=tokenizer)


@pytest.mark.parametrize("options, change, message", [
    (dict(loss="dpo", label_smoothing=0.1), lambda args: setattr(args, "label_smoothing", 0.0),
     r"label_smoothing=0.0 and loss_hparams\['label_smoothing'\]=0.1 disagree"),
    (dict(loss="amapo", amapo_variant="paper"), lambda args: setattr(args, "amapo_variant", None),
     r"amapo_variant=None and loss_hparams\['variant'\]='paper' disagree"),
    (dict(loss="amapo", amapo_ablation="no_exp"), lambda args: setattr(args, "amapo_ablation", None),
     r"amapo_ablation=None and loss_hparams\['ablation'\]='no_exp' disagree")])
def test_an_alias_set_back_to_its_unset_value_is_checked(tokenizer, hh_pairs, tmp_path, monkeypatch, options, change,
                                                         message):
    """TRL's alias fields mirror loss_hparams after construction: one set back to its unset value (0.0, None) was
    passed over, and the trainer trained with the smoothing, variant or ablation the user had turned off."""
    monkeypatch.setattr(DPOTrainer, "_prepare_dataset", lambda *args, **kwargs: pytest.fail("tokenized first"))
    args = PreferenceConfig(output_dir=str(tmp_path), max_steps=1, **TRAINING, **options)
    change(args)
    with pytest.raises(ValueError, match=message):
        PreferenceTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=hh_pairs,
                          processing_class=tokenizer)


def test_a_vision_language_processor_is_refused_before_tokenization(tokenizer, hh_pairs, tmp_path, monkeypatch):
    """A processor (a vision-language model's) was refused after DPOTrainer's constructor, i.e. after the datasets
    were tokenized and every reference log-prob computed: now first."""
    monkeypatch.setattr(DPOTrainer, "_prepare_dataset", lambda *args, **kwargs: pytest.fail("tokenized first"))
    processor = transformers.LlavaProcessor(transformers.CLIPImageProcessor(), tokenizer)
    args = PreferenceConfig(output_dir=str(tmp_path), max_steps=1, **TRAINING, loss="dpo")
    with pytest.raises(ValueError, match="supports causal language models; got a vision-language processor"):
        PreferenceTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=hh_pairs,
                          processing_class=processor)


def test_sync_ref_model_names_the_precompute_default(tmp_path):
    """sync_ref_model=True needs a live reference, but precompute_ref_log_probs is True by default here (False in
    DPOConfig): DPOTrainer's error came after the datasets were tokenized, naming a flag the user never set. Now
    PreferenceConfig refuses it, naming both; with precompute_ref_log_probs=False it is built."""
    config = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, loss="dpo", sync_ref_model=True)
    with pytest.raises(ValueError, match="sync_ref_model=True.*precompute_ref_log_probs=False"):
        PreferenceConfig(**config)
    assert PreferenceConfig(**config, precompute_ref_log_probs=False).sync_ref_model


def test_a_reference_method_names_the_reference_of_a_model_built_in_memory(tokenizer, hh_pairs, tmp_path):
    """Without ref_model and precomputed log-probs, DPOTrainer builds the reference from the policy's name or path:
    a model built in memory has none, and TRL failed with "Repo id must use alphanumeric chars ...: ''". Now an
    error names ref_model and the ways out; with a ref_model (or precomputed log-probs, the default) it trains."""
    args = PreferenceConfig(output_dir=str(tmp_path), **{**TRAINING, "max_steps": 1}, loss="dpo",
                            precompute_ref_log_probs=False)
    model = tiny_llama(len(tokenizer))
    with pytest.raises(ValueError, match=r"^ref_model: loss='dpo' needs a reference model.*built in memory"):
        PreferenceTrainer(model=model, args=args, train_dataset=hh_pairs, processing_class=tokenizer)
    trainer = PreferenceTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=hh_pairs,
                                processing_class=tokenizer)
    assert math.isfinite(trainer.train().training_loss)


@pytest.mark.parametrize("loss", ["amapo", "dpo"])
def test_a_dataset_left_empty_by_truncation_is_named(tokenizer, hh_pairs, tmp_path, loss):
    """With truncation_mode="keep_start" TRL drops the examples whose prompt fills max_length: an eval dataset left
    empty was evaluated with no metric but its runtime (amapo), or failed in the reference precompute with
    "torch.cat(): expected a non-empty list of Tensors" (dpo). Found by a fuzz of PreferenceConfig combinations."""
    args = PreferenceConfig(output_dir=str(tmp_path), **{**TRAINING, "max_length": 16, "max_steps": 1}, loss=loss,
                            eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2)
    eval_pairs = hh_pairs.select(range(16, 24))
    for train, evaluated, name in ((hh_pairs.select(range(16)), eval_pairs, "eval"), (eval_pairs, None, "train")):
        with pytest.raises(ValueError, match=rf"^{name} dataset: none of its 8 examples is left after tokenization: "
                                             r"with truncation_mode='keep_start'.*max_length=16; raise max_length, "
                                             r"or shorten those prompts"):
            PreferenceTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=train,
                              eval_dataset=evaluated, processing_class=tokenizer)


def test_trl_loss_options_raise(tmp_path):
    """Every DPOConfig option that shapes TRL's own loss is refused at a non-default value, naming it."""
    config = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    for name, value in (("loss_type", ["ipo"]), ("loss_weights", [1.0]), ("ld_alpha", 0.5),
                        ("f_divergence_type", "js_divergence"), ("use_weighting", True)):
        with pytest.raises(ValueError, match=f"^{name}=.* configures TRL's own loss"):
            PreferenceConfig(**config, **{name: value})


@pytest.mark.parametrize("loss, name", [("amapo", "per_device_train_batch_size"),
                                        ("alpha_dpo", "per_device_train_batch_size"),
                                        ("amapo", "per_device_eval_batch_size")])
def test_z_score_methods_refuse_one_pair_batches(tokenizer, hh_pairs, tmp_path, loss, name):
    """AMaPO's mean and std (alpha_dpo's z-score) span one micro-batch of every process, not the accumulated
    batch: with one pair there (the paper's recipe, per_device_train_batch_size=1 x 32 accumulation, on one
    process) every z-score is 0 and AMaPO's margin with it, a margin-free SimPO trained silently. An error naming
    the batch size; a method without batch statistics trains on one pair, and alpha_dpo with alpha=0 (no z-score
    term) is built."""
    sizes = {"per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, name: 1}
    args = PreferenceConfig(output_dir=str(tmp_path), loss=loss, max_steps=1, gradient_accumulation_steps=2,
                            **{**TRAINING, **sizes})
    with pytest.raises(ValueError, match=f"^{name}=1 with 1 process.*loss='{loss}'"):
        PreferenceTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=hh_pairs,
                          eval_dataset=hh_pairs.select(range(4)), processing_class=tokenizer)
    trained(make_trainer(recording(PreferenceTrainer), PreferenceConfig, tokenizer, hh_pairs, tmp_path / "simpo",
                         loss="simpo", max_steps=1, per_device_train_batch_size=1))
    make_trainer(PreferenceTrainer, PreferenceConfig, tokenizer, hh_pairs, tmp_path / "alpha0", loss="alpha_dpo",
                 loss_hparams={"alpha": 0.0}, max_steps=1, per_device_train_batch_size=1)


def test_z_score_methods_refuse_a_one_pair_eval_batch_passed_to_evaluate(tokenizer, hh_pairs, tmp_path):
    """The eval batch size is checked for an eval set given to the constructor; one given to evaluate() ran with
    per_device_eval_batch_size=1: eval_batch_margin_std 0, AMaPO's eval loss without its margin, silently."""
    trainer = make_trainer(PreferenceTrainer, PreferenceConfig, tokenizer, hh_pairs, tmp_path, loss="amapo",
                           max_steps=1, per_device_eval_batch_size=1)
    with pytest.raises(ValueError, match="^per_device_eval_batch_size=1 with 1 process.*loss='amapo'"):
        trainer.evaluate(hh_pairs.select(range(4)))
    simpo = make_trainer(PreferenceTrainer, PreferenceConfig, tokenizer, hh_pairs, tmp_path / "simpo", loss="simpo",
                         max_steps=1, per_device_eval_batch_size=1)
    assert math.isfinite(simpo.evaluate(hh_pairs.select(range(4)))["eval_loss"])


# ----------------------------------------------------------------------------------------------------
# Two processes: AMaPO's statistics over both ranks
# ----------------------------------------------------------------------------------------------------

WORLD = 2


def distributed_worker(rank, tokenizer_dir, out_dir, port, make_model, options):
    """Process `rank` of WORLD: two steps of a PreferenceTrainer (a model from make_model(vocabulary size),
    `options` for its config) under DDP (gloo); its recorded steps and log saved as rank{rank}.pt."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD)})
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    dataset = Dataset.from_list(load_records("bundled:hh-rlhf", "train", PAIRS))
    trainer = make_trainer(recording(PreferenceTrainer), PreferenceConfig, tokenizer, dataset, Path(out_dir),
                           model=make_model(len(tokenizer)), max_steps=2, ddp_backend="gloo", **options)
    trained(trainer)
    torch.save({"steps": trainer.steps, "log": trainer.state.log_history}, Path(out_dir) / f"rank{rank}.pt")
    trainer.accelerator.wait_for_everyone()  # no rank tears the group down while another still talks to it
    # the Trainer leaves the group alive; gloo's worker threads, still running in the interpreter's teardown,
    # abort the process at times (SIGABRT, "terminate called without an active exception": torch's issue 190489)
    torch.distributed.destroy_process_group()


def trained_on_two_processes(tokenizer, tmp_path, make_model, **options) -> list[dict]:
    """Each rank's recorded steps and log of distributed_worker."""
    tokenizer_dir = _saved(tokenizer, tmp_path / "tokenizer")
    mp.spawn(distributed_worker, args=(tokenizer_dir, str(tmp_path), free_port(), make_model, options), nprocs=WORLD,
             join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def test_amapo_statistics_span_two_processes(tokenizer, tmp_path):
    ranks = trained_on_two_processes(tokenizer, tmp_path, tiny_llama, loss="amapo")
    log = [entry for entry in ranks[0]["log"] if "batch_margin_mean" in entry]
    model = tiny_llama(len(tokenizer))
    for index, step in enumerate(ranks[0]["steps"]):
        model.load_state_dict(step["state"])  # the same on both ranks: DDP
        per_rank = []
        with torch.no_grad():
            for rank in ranks:
                inputs = rank["steps"][index]["inputs"]
                labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
                logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
                per_rank.append(ak.sequence_logps(logits, labels, shift=True).chunk(2))
        chosen, rejected = (torch.cat([logps[side] for logps in per_rank]) for side in (0, 1))
        union, stats = ak.amapo_loss(chosen, rejected, return_stats=True)  # one process, every pair
        trainer_losses = [rank["steps"][index]["loss"] for rank in ranks]
        assert abs(sum(trainer_losses) / WORLD - union.item()) <= TOLERANCE, (trainer_losses, union.item())
        assert log[index]["batch_margin_mean"] == pytest.approx(stats["batch_margin_mean"].item(), abs=1e-6)
        assert log[index]["batch_margin_std"] == pytest.approx(stats["batch_margin_std"].item(), abs=1e-6)
        beta = method_defaults("amapo")["beta"]  # the trainer's: rewards = beta x log-probs
        for side, logps in (("chosen", chosen), ("rejected", rejected)):  # TRL's metrics: every rank's pairs
            assert log[index][f"logps/{side}"] == pytest.approx(logps.mean().item(), rel=1e-6)
            assert log[index][f"rewards/{side}"] == pytest.approx(beta * logps.mean().item(), rel=1e-6)
        local = [ak.amapo_loss(c, r).item() for c, r in per_rank]  # per-rank statistics: not what was trained
        assert max(abs(a - b) for a, b in zip(local, trainer_losses)) > 10 * TOLERANCE


def test_moe_router_aux_loss_on_two_processes(tokenizer, tmp_path):
    """A Mixtral under DDP (2 processes, fused path): each rank's loss is its own pairs' loss plus 0.5 x the
    model's own router load-balancing loss of its batch, as DPOTrainer adds it per rank; aux_loss is logged as
    the mean over the ranks."""
    ranks = trained_on_two_processes(tokenizer, tmp_path, tiny_mixtral, loss="simpo", router_aux_loss_coef=0.5)
    model = tiny_mixtral(len(tokenizer))
    hparams = method_defaults("simpo")
    for index in range(2):
        router_losses = []
        for rank in ranks:
            step = rank["steps"][index]
            model.load_state_dict(step["state"])
            inputs = step["inputs"]
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            with torch.no_grad():
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                output_router_logits=True)
            chosen, rejected = ak.sequence_logps(outputs.logits, labels, shift=True).chunk(2)
            expected = ak.preference_loss(chosen, rejected, method="simpo", **hparams) + 0.5 * outputs.aux_loss
            assert abs(step["loss"] - expected.item()) <= TOLERANCE, (index, step["loss"], expected.item())
            router_losses.append(outputs.aux_loss.item())
        logged = [entry for entry in ranks[0]["log"] if "aux_loss" in entry][index]["aux_loss"]
        assert logged == pytest.approx(sum(router_losses) / WORLD, rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3 (one CPU process, in a subprocess: DeepSpeed's global state stays out of the other tests)
# ----------------------------------------------------------------------------------------------------

ZERO3_SCRIPT = r"""
import importlib, json, sys
import torch
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # one process: no shm op build
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
import test_trl_integration as t

tokenizer = t.PreTrainedTokenizerFast.from_pretrained(sys.argv[1])
make_model, run_options = getattr(t, sys.argv[2]), json.loads(sys.argv[3])
dataset = t.Dataset.from_list(t.load_records("bundled:hh-rlhf", "train", t.PAIRS))
zero3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "zero_allow_untested_optimizer": True}
options = {**{k: v for k, v in t.TRAINING.items() if k != "use_cpu"}, **run_options}
args = t.PreferenceConfig(output_dir="zero3", deepspeed=zero3, **options)
trainer = t.recording(t.PreferenceTrainer)(model=make_model(len(tokenizer)), args=args, train_dataset=dataset,
                                           processing_class=tokenizer)
trainer.steps = []
trainer.train()
head = trainer.model_wrapped.module.lm_head.weight
print("RESULT " + json.dumps({"zero3": is_deepspeed_zero3_enabled(), "partitioned": head.numel() == 0,
                              "losses": [step["loss"] for step in trainer.steps],
                              "log": [entry for entry in trainer.state.log_history if "loss" in entry]}), flush=True)
torch.distributed.destroy_process_group()  # the Trainer leaves DeepSpeed's gloo group alive: as distributed_worker
"""


def trained_under_zero3(tokenizer, tmp_path, make_model, **options) -> dict:
    """ZERO3_SCRIPT's result: a PreferenceTrainer (model make_model(vocabulary size), `options` for its config)
    under ZeRO-3 on one CPU process, in a subprocess; refuses a run in which lm_head's weight was not partitioned
    (it would prove nothing)."""
    import json
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    script = tmp_path / "zero3_run.py"
    script.write_text(ZERO3_SCRIPT)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "CUDA_VISIBLE_DEVICES": "",
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(script), _saved(tokenizer, tmp_path / "tokenizer"), make_model.__name__,
                           json.dumps(options)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["zero3"] and result["partitioned"], "ZeRO-3 did not partition lm_head.weight: proves nothing"
    return result


def test_zero3_trains_as_without(tokenizer, hh_pairs, tmp_path):
    """Under ZeRO-3 the fused path reads a partitioned lm_head weight: the per-step losses equal a plain run's
    (steps 2 and 3 depend on the lm_head gradient of the steps before)."""
    plain = trained(make_trainer(recording(PreferenceTrainer), PreferenceConfig, tokenizer, hh_pairs, tmp_path,
                                 loss="amapo", max_steps=3))
    result = trained_under_zero3(tokenizer, tmp_path, tiny_llama, loss="amapo", max_steps=3)
    assert result["losses"] == pytest.approx([step["loss"] for step in plain.steps], abs=TOLERANCE)


def tiny_llama_peft_head(vocab_size):
    """tiny_llama under PEFT: LoRA on q_proj and a trained copy of the lm_head (modules_to_save)."""
    return peft.get_peft_model(tiny_llama(vocab_size), lm_head_copy_config())


def test_peft_lm_head_copy_under_zero3(tokenizer, hh_pairs, tmp_path):
    """PEFT's modules_to_save copy of the lm_head under ZeRO-3, DPO with the live adapter-disabled reference
    (fused path): the policy reads the trained copy, the reference the original, each partitioned; the
    per-step losses equal a plain run's (from step 2 the copy differs from the original)."""
    options = dict(loss="dpo", max_steps=3, precompute_ref_log_probs=False)
    plain = trained(make_trainer(recording(PreferenceTrainer), PreferenceConfig, tokenizer, hh_pairs, tmp_path,
                                 model=tiny_llama_peft_head(len(tokenizer)), **options))
    losses = [step["loss"] for step in plain.steps]
    assert abs(losses[0] - math.log(2)) <= TOLERANCE < abs(losses[2] - math.log(2))
    result = trained_under_zero3(tokenizer, tmp_path, tiny_llama_peft_head, **options)
    assert result["losses"] == pytest.approx(losses, abs=TOLERANCE)


def test_moe_router_aux_loss_under_zero3(tokenizer, hh_pairs, tmp_path):
    """A Mixtral under ZeRO-3 (experts, router and lm_head partitioned; fused path): the losses, router
    load-balancing loss x 0.5 included, and the logged aux_loss equal a plain run's, step for step (steps 2 and
    3 depend on the router's and the experts' gradients of the steps before)."""
    options = dict(loss="simpo", router_aux_loss_coef=0.5, max_steps=3)
    plain = trained(make_trainer(recording(PreferenceTrainer), PreferenceConfig, tokenizer, hh_pairs, tmp_path,
                                 model=tiny_mixtral(len(tokenizer)), **options))
    result = trained_under_zero3(tokenizer, tmp_path, tiny_mixtral, **options)
    assert result["losses"] == pytest.approx([step["loss"] for step in plain.steps], abs=TOLERANCE)
    plain_log = [entry for entry in plain.state.log_history if "loss" in entry]
    assert len(result["log"]) == len(plain_log) == 3 and plain_log[0]["aux_loss"] > 0
    for zero3_entry, plain_entry in zip(result["log"], plain_log):
        assert zero3_entry["aux_loss"] == pytest.approx(plain_entry["aux_loss"], abs=TOLERANCE)


# ----------------------------------------------------------------------------------------------------
# FSDP2 (accelerate's own preparation and fully_shard by hand, 2 CPU processes, gloo)
# ----------------------------------------------------------------------------------------------------

FSDP_VOCAB, FSDP_STEPS, FSDP_LEARNING_RATE = 96, 2, 0.5
# case: (PEFT's modules_to_save copy of the lm_head or not; how the model is sharded: accelerate's own FSDP2
# preparation with its transformer-layer wrap, or by hand: every decoder layer, these modules (paths under the
# model that computes the logits) and the root; the FSDP2 units around the head; the modules of the head's unit,
# None in the root's). accelerate 1.15 carves the final norm and the lm_head into one unit after its policy's;
# by hand the lm_head can be in the root's unit or in one of its own (a size-based wrap's: accelerate 1.15's own
# stops on a Llama's ModuleList), and PEFT's copies and their wrapper in units of their own, or the wrapper alone
# (each copy under min_num_params, both over it).
ACCELERATE = "accelerate"
LM_HEAD, PEFT_HEAD = "lm_head", "base_model.model.lm_head"
FSDP_CASES = {
    "root": (False, (), [""], None),
    "own": (False, ("lm_head",), ["", LM_HEAD], [LM_HEAD]),
    "accelerate": (False, ACCELERATE, ["", LM_HEAD], ["model.norm", LM_HEAD]),
    "peft_copies": (True, ("lm_head.original_module", "lm_head.modules_to_save.default", "lm_head"),
                    ["", PEFT_HEAD, f"{PEFT_HEAD}.original_module", f"{PEFT_HEAD}.modules_to_save.default"],
                    [PEFT_HEAD]),
    "peft_wrapper": (True, ("lm_head",), ["", PEFT_HEAD], [PEFT_HEAD]),
    "peft_accelerate": (True, ACCELERATE, ["", PEFT_HEAD], [PEFT_HEAD]),
}


def fsdp_batch(rank: int, step: int):
    """Process `rank`'s token ids and labels (the prompt's 5 positions ignored) at `step`."""
    generator = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(0, FSDP_VOCAB, (4, 12), generator=generator)
    return ids, ids.masked_fill(torch.arange(12) < 5, -100)


def fsdp_model(peft_head: bool):
    """The model of test_fused_head_under_fsdp2, unsharded: a tiny Llama; with `peft_head`, with LoRA on q_proj
    and a modules_to_save copy of the lm_head, the copy made unlike the original (so that reading the wrong one
    shows: the adapter-disabled reference reads the original)."""
    if not peft_head:
        return tiny_llama(FSDP_VOCAB)
    model = tiny_llama_peft_head(FSDP_VOCAB)
    with torch.no_grad():
        model.get_base_model().lm_head.modules_to_save["default"].weight.mul_(1.5)
    return model


def fsdp_shard(model, rank: int, wrap):
    """`model` sharded by FSDP2 as FSDP_CASES says (`wrap`): by accelerate's own fsdp2_prepare_model with its
    transformer-layer wrap (what the Trainer runs on GPUs; on a CPU accelerate turns FSDP into DDP, so its
    function is called here directly, with the fields of the accelerator it reads), or by hand."""
    from torch.distributed.fsdp import fully_shard

    if wrap == ACCELERATE:
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
        accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                      is_main_process=rank == 0, device=torch.device("cpu"), torch_device_mesh=None)
        return fsdp2_prepare_model(accelerator, model)
    logits_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in (*logits_model.model.layers, *map(logits_model.get_submodule, wrap)):
        fully_shard(module)
    return fully_shard(model)


def fsdp_worker(rank, port, case, out_dir):
    """Process `rank` of WORLD: the fused head on fsdp_model sharded as FSDP_CASES[case] says, FSDP_STEPS SGD
    steps; its log-probs (and, with PEFT, the adapter-disabled reference's), the trained parameters' gradients
    (gathered), the names of the FSDP units around the head and the type of its weight saved as rank{rank}.pt."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from amapo_kernels.integrations.trl import _add_sequence_logps_head

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    peft_head, wrap, _, _ = FSDP_CASES[case]
    model = fsdp_model(peft_head)
    _add_sequence_logps_head(model)  # before sharding, as PreferenceTrainer (accelerate shards in train())
    model = fsdp_shard(model, rank, wrap)
    head = model.get_output_embeddings()
    units = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)
             and (name == "" or "lm_head" in name)]
    names = {module: name for name, module in model.named_modules()}
    head_unit = None
    if isinstance(head, FSDPModule):
        head_unit = [names[module] for module in head._get_fsdp_state()._modules]
    optimizer, steps = torch.optim.SGD(model.parameters(), lr=FSDP_LEARNING_RATE), []
    for step in range(FSDP_STEPS):
        ids, labels = fsdp_batch(rank, step)
        logps, _ = model(input_ids=ids, preference_labels=labels, average_logps=True)
        reference = None
        if peft_head:  # before the backward, as TRL does (a forward between the backward and the step loses the
            # gradients of a unit kept unsharded after its forward, as accelerate's lm_head unit: FSDP2's doing)
            with model.disable_adapter(), torch.no_grad():
                reference, _ = model(input_ids=ids, preference_labels=labels, average_logps=True)
        logps.sum().backward()
        steps.append({"logps": logps.detach(), "reference": reference,
                      "grads": {name: parameter.grad.full_tensor() for name, parameter in model.named_parameters()
                                if parameter.requires_grad}})
        optimizer.step()
        optimizer.zero_grad()
    torch.save({"steps": steps, "head": type(head.weight).__name__, "units": units, "head_unit": head_unit},
               Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()


@pytest.mark.parametrize("case", FSDP_CASES)
def test_fused_head_under_fsdp2(tmp_path, case):
    """FSDP2 shards the lm_head's weight (a DTensor between forwards). The fused path never calls the head as a
    module; its preference_logps method is registered as a forward method of a unit of its own, so that FSDP
    gathers the weight for the call and again for its backward ("lm_head_weight is a DTensor" before); in the
    unit accelerate makes of the final norm and the head, the norm's forward gathers it (the method registered
    there crashed torch 2.11); PEFT's modules_to_save wrapper's method calls that of the copy its forward would
    call (the trained copy; the original with the adapter disabled; a TypeError before, with the copies in units
    of their own). In the root's unit the head is gathered by the root's forward. Each
    process's log-probs (and reference log-probs) and the gradients FSDP averages over the processes equal an
    unsharded model's, over two SGD steps (the second's depend on the first's gradients)."""
    peft_head, _, units, head_unit = FSDP_CASES[case]
    mp.spawn(fsdp_worker, args=(free_port(), case, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    assert all(rank["head"] == "DTensor" for rank in ranks), "lm_head.weight was not sharded: proves nothing"
    assert (ranks[0]["units"], ranks[0]["head_unit"]) == (units, head_unit), "not the units the case is about"
    model = fsdp_model(peft_head)
    trained = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
    optimizer = torch.optim.SGD(trained.values(), lr=FSDP_LEARNING_RATE)
    for step in range(FSDP_STEPS):
        optimizer.zero_grad()
        total = 0
        for rank in range(WORLD):
            ids, labels = fsdp_batch(rank, step)
            logps = ak.sequence_logps(model(input_ids=ids).logits, labels, shift=True, average=True)
            assert ranks[rank]["steps"][step]["logps"] == pytest.approx(logps.detach(), abs=TOLERANCE)
            if peft_head:
                with model.disable_adapter(), torch.no_grad():
                    reference = ak.sequence_logps(model(input_ids=ids).logits, labels, shift=True, average=True)
                assert not torch.allclose(reference, logps, atol=1e-3)  # the copies differ: the test can tell
                assert ranks[rank]["steps"][step]["reference"] == pytest.approx(reference, abs=TOLERANCE)
            total = total + logps.sum() / WORLD
        total.backward()
        assert ranks[0]["steps"][step]["grads"].keys() == trained.keys()
        for name, parameter in trained.items():
            grads = [rank["steps"][step]["grads"][name] for rank in ranks]
            assert torch.equal(grads[0], grads[1]), name
            assert torch.allclose(grads[0], parameter.grad, rtol=1e-5, atol=1e-7), (step, name)
        optimizer.step()


# ----------------------------------------------------------------------------------------------------
# Documentation
# ----------------------------------------------------------------------------------------------------

README_MARKER = "<!-- test: tests/test_trl_integration.py -->"


def test_readme_trl_script_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    block = re.search(re.escape(README_MARKER) + r"\s*```python\n(.*?)```", readme, re.S)
    assert block, f"README has no ```python block after {README_MARKER}"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    exec(compile(block.group(1), "README.md (Use with TRL)", "exec"), namespace)
    assert namespace["trainer"].state.global_step > 0
    assert namespace["trainer"].ref_model is None


def test_model_card_names_no_dpo_paper(tokenizer, hh_pairs, tmp_path):
    """The model card TRL writes with every checkpoint (and pushes to the Hub) cites the trainer's paper:
    DPOTrainer's is the DPO paper, which an AMaPO run did not train."""
    trainer = make_trainer(PreferenceTrainer, PreferenceConfig, tokenizer, hh_pairs, tmp_path, loss="amapo",
                           max_steps=1)
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "amapo-kernels" in card  # the card was written, with this trainer's tags
    assert "Direct Preference Optimization" not in card and "rafailov" not in card


def load_runner():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_preference", ROOT / "examples/trl/run_preference.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    return runner


def test_example_recipe_parses(tmp_path):
    """The alignment-handbook-style recipe reads into the runner's arguments (nothing is downloaded)."""
    recipe = ROOT / "examples/trl/amapo-llama3-8b-base.yaml"
    script, training, model, _ = load_runner().parse(["--config", str(recipe), "--output_dir", str(tmp_path),
                                                      "--use_cpu", "true", "--bf16", "false"])
    assert isinstance(training, PreferenceConfig)
    assert (training.loss, training.loss_hparams["beta"], training.learning_rate) == ("amapo", 3.0, 6e-7)
    assert training.is_reference_free and training.loss_impl == "fused"
    assert model.model_name_or_path == "princeton-nlp/Llama-3-Base-8B-SFT"
    assert script.dataset_name == "HuggingFaceH4/ultrafeedback_binarized"
    with pytest.raises(TypeError, match="loss_hparams must be a dict"):
        load_runner().parse(["--output_dir", str(tmp_path), "--use_cpu", "true", "--loss_hparams", "[1]"])


@pytest.mark.parametrize("args, error", [
    (["--config", "{tmp}/missing.yaml"], r"No such file or directory: '\S+/missing.yaml'"),
    (["--config", "{tmp}/broken.yaml"], r"while parsing a flow sequence in \"\S+/broken.yaml\""),
    (["--loss", "nosuch"], r"loss must be one of \['alpha_dpo', .*\], got 'nosuch'"),
    (["--loss_hparams", '{{"gamma": 1}}'], r"loss_hparams: loss='amapo' has no hyperparameter \['gamma'\]"),
])
def test_runner_configuration_error_is_one_line(tmp_path, capsys, args, error):
    """A configuration error of the runner (the recipe, a field PreferenceConfig refuses) is one line on stderr and
    exit status 2, as argparse says an unknown flag; it was a traceback."""
    (tmp_path / "broken.yaml").write_text("loss: [amapo\n")
    args = [arg.format(tmp=tmp_path) for arg in args]
    with pytest.raises(SystemExit) as exited:
        load_runner().main(["--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "false", *args])
    stderr = [line for line in capsys.readouterr().err.splitlines() if "Warning" not in line and "warn(" not in line]
    assert exited.value.code == 2 and len(stderr) == 1, stderr
    assert re.fullmatch(f"run_preference.py: error: .*{error}.*", stderr[0]), stderr[0]


@pytest.fixture(scope="module")
def local_hub(tokenizer, tmp_path_factory):
    """A tiny model and train / test JSON files on disk: what the runner loads by name."""
    import json

    root = tmp_path_factory.mktemp("hub")
    tokenizer.save_pretrained(root / "model")
    tiny_llama(len(tokenizer)).save_pretrained(root / "model")
    records = load_records("bundled:hh-rlhf", "train", 12)
    (root / "data").mkdir()
    for split, rows in (("train", records[:8]), ("test", records[8:])):
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def runner_args(local_hub, out, *extra):
    return ["--model_name_or_path", str(local_hub / "model"), "--dataset_name", str(local_hub / "data"),
            "--output_dir", str(out), "--use_cpu", "true", "--bf16", "false", "--loss", "simpo",
            "--per_device_train_batch_size", "4", "--max_length", "64", "--report_to", "none",
            "--gradient_checkpointing", "false", "--logging_steps", "1", "--disable_tqdm", "true",
            "--save_strategy", "no", *extra]


def test_runner_resumes_and_keeps_model_init_kwargs(local_hub, tmp_path, monkeypatch):
    """As TRL's scripts/dpo.py: --resume_from_checkpoint resumes, the recipe's model_init_kwargs extend the
    model arguments', --dataset_streaming streams."""
    runner = load_runner()
    trainer = runner.main(runner_args(local_hub, tmp_path, "--max_steps", "2", "--save_strategy", "steps",
                                      "--save_steps", "2", "--model_init_kwargs", '{"attn_implementation": "eager"}'))
    assert trainer.model.config._attn_implementation == "eager"
    assert (tmp_path / "checkpoint-2").is_dir()

    monkeypatch.setattr(runner, "PreferenceTrainer", recording(PreferenceTrainer))
    runner.PreferenceTrainer.steps = []
    resumed = runner.main(runner_args(local_hub, tmp_path, "--max_steps", "3",
                                      "--resume_from_checkpoint", str(tmp_path / "checkpoint-2")))
    assert resumed.state.global_step == 3 and len(resumed.steps) == 1  # step 3 only: steps 1-2 are restored

    streamed = runner.main(runner_args(local_hub, tmp_path / "stream", "--max_steps", "1",
                                       "--dataset_streaming", "true"))
    from datasets import IterableDataset

    assert isinstance(streamed.train_dataset, IterableDataset) and streamed.state.global_step == 1


def test_runner_load_in_4bit_is_not_dropped(local_hub, tmp_path):
    """--load_in_4bit reaches the model loading: without bitsandbytes, transformers' error, not a full-precision
    run."""
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed: 4-bit loading would run")
    with pytest.raises(ImportError, match="bitsandbytes"):
        load_runner().main(runner_args(local_hub, tmp_path, "--max_steps", "1", "--load_in_4bit", "true"))


# ----------------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("disable", [True, False])
def test_disable_dropout_turns_off_every_dropout(tokenizer, hh_pairs, tmp_path, disable):
    """disable_dropout=True (DPOConfig's default) leaves no dropout in the policy or the reference model: a Llama's
    attention_dropout, which DPOTrainer's nn.Dropout walk leaves on (its reference log-probs, computed in eval
    mode, then differ from the policy's at the first step), is off too; disable_dropout=False keeps it."""
    import copy

    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        attention_dropout=0.5))
    args = PreferenceConfig(output_dir=str(tmp_path / "out"), **{**TRAINING, "loss": "dpo", "disable_dropout": disable,
                                                                 "precompute_ref_log_probs": False})
    trainer = PreferenceTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=hh_pairs,
                                processing_class=tokenizer)
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    for network in (trainer.model, trainer.ref_model):
        network.train()
        with torch.no_grad():
            first, second = network(input_ids=ids).logits, network(input_ids=ids).logits
        assert torch.equal(first, second) == disable


def test_precomputed_reference_log_probs_are_computed_without_dropout(tokenizer, hh_pairs, tmp_path):
    """DPOTrainer precomputes the reference log-probs inside its constructor, before disable_dropout turned off
    the attention_dropout of a model built in memory (train mode): the cached values carried dropout noise, and
    DPO's first step, where the policy is its reference, was not log 2."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        attention_dropout=0.5))
    trainer = trained(make_trainer(recording(PreferenceTrainer), PreferenceConfig, tokenizer, hh_pairs, tmp_path,
                                   model=model, loss="dpo", max_steps=1))
    assert trainer.steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_a_streaming_dataset_names_the_precompute_default(tokenizer, hh_pairs, tmp_path):
    """A reference method on an iterable (streaming) dataset: TRL's error said `precompute_ref_log_probs=True` is
    not supported, a flag the user never set (it is this config's default); now the error says so and names the
    way out."""
    args = PreferenceConfig(output_dir=str(tmp_path), **{**TRAINING, "max_steps": 1}, loss="dpo")
    with pytest.raises(ValueError, match="train dataset: a streaming .* True by default here .* "
                                         "set precompute_ref_log_probs=False"):
        PreferenceTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=hh_pairs.to_iterable_dataset(),
                          processing_class=tokenizer)
