"""TRL integration: `PreferenceTrainer`, TRL's `DPOTrainer` with its log-probs and loss computed by this library.

    from amapo_kernels.integrations.trl import PreferenceConfig, PreferenceTrainer
    args = PreferenceConfig(output_dir="out", loss="amapo", loss_hparams={"beta": 3.0})
    PreferenceTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train()

Everything but the loss is TRL's (pinned to trl 1.16: `pip install amapo-kernels[trl]`): dataset formats and
tokenization, collation, precomputed reference log-probs, PEFT, accelerate / DeepSpeed launch, logging,
checkpoints. What differs from DPOTrainer:
- `loss` is any method of `amapo_kernels.preference_loss` (default "amapo"), with `loss_hparams` defaulted per
  method; TRL's `beta` / `label_smoothing` (as alignment-handbook recipes set them) fill the method's own.
- Log-probs come from `sequence_logps_from_hidden` (loss_impl="fused": the lm_head fused with the log-softmax,
  no logits) or `sequence_logps` from the logits (loss_impl="ops"), summed or length-normalized as the method
  defines, computed inside the model's forward so DDP and DeepSpeed see an ordinary forward.
- Reference-free methods (amapo, simpo, cpo, slic's rank form) build no reference model; the others use TRL's
  precomputed reference log-probs (the default here) or TRL's live reference model, computed by this library.
- AMaPO's batch statistics span every rank (amapo_loss all-reduces them when torch.distributed is initialized).
- Logged: TRL's `rewards/*`, `logps/*` and `num_tokens` (rewards = beta x the method's log-probs, minus the
  reference's where there is one), plus AMaPO's `batch_margin_mean`, `batch_margin_std`, `adaptive_margin`.
  TRL's `entropy`, `logits/*` and `mean_token_accuracy` need the logits the fused path never builds: not logged.
"""

import contextlib
import functools
import types
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    from accelerate.utils import is_peft_model
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    from trl import DPOConfig, DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("amapo_kernels.integrations.trl needs TRL 1.16: pip install 'amapo-kernels[trl]'") from error

import amapo_kernels as ak
from amapo_kernels._checks import check_choice
from amapo_kernels.integrations.hf_head import fused_logit_softcap
from amapo_kernels.preference import METHODS, method_defaults, needs_reference, resolved_hparams, uses_mean_logps

LOSS_IMPLS = ("fused", "ops")
# ODPO's per-pair scores would need dataset columns TRL's collator does not carry.
UNSUPPORTED_METHODS = {"odpo": "it needs per-pair scores (chosen_scores / rejected_scores), which TRL's collator drops"}
# TRL's names for hyperparameters of this library's methods: (PreferenceConfig field, hyperparameter, unset value).
TRL_ALIASES = (("beta", "beta", None), ("label_smoothing", "label_smoothing", 0.0),
               ("amapo_variant", "variant", None), ("amapo_ablation", "ablation", None))
# DPOConfig options that shape TRL's own loss; this trainer's loss is `loss`, so a non-default value is an error.
TRL_LOSS_OPTIONS = (("loss_type", ["sigmoid"]), ("loss_weights", None), ("ld_alpha", None),
                    ("f_divergence_type", "reverse_kl"), ("use_weighting", False))


@dataclass
class PreferenceConfig(DPOConfig):
    """DPOConfig plus the loss of this library. See the module docstring."""

    _VALID_DICT_FIELDS = DPOConfig._VALID_DICT_FIELDS + ["loss_hparams"]

    loss: str = field(default="amapo", metadata={"help": f"Preference loss, one of {sorted(METHODS)}."})
    loss_hparams: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Hyperparameters of `loss` (JSON on the command line); missing ones get the method's "
                          "defaults, as amapo_kernels.preference_loss does. Filled in after construction."},
    )
    loss_impl: str = field(
        default="fused",
        metadata={"help": "'fused': log-probs from the hidden states with the lm_head fused in (no logits); "
                          "'ops': log-probs from the logits through this library's op."},
    )
    amapo_variant: str | None = field(
        default=None, metadata={"help": "loss='amapo' only: 'code' (the authors' trainer, default) or 'paper'."}
    )
    amapo_ablation: str | None = field(
        default=None,
        metadata={"help": "loss='amapo' only: 'no_znorm', 'no_exp', 'no_adaptive' or 'no_zero' (paper Table 5)."},
    )
    beta: float | None = field(
        default=None,
        metadata={"help": "TRL's name for the method's beta: sets loss_hparams['beta'] (default: the method's). "
                          "After construction, the beta the logged rewards are scaled by (1 for a method without)."},
    )
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={"help": "Reference methods: compute the reference log-probs once before training (TRL's "
                          "option, on by default here). Reference-free methods never use a reference model."},
    )

    def __post_init__(self):
        super().__post_init__()  # parses `loss_hparams` given as JSON text
        if self.loss in UNSUPPORTED_METHODS:
            raise ValueError(f"loss={self.loss!r} is not supported by PreferenceTrainer: {UNSUPPORTED_METHODS[self.loss]}")
        check_choice("loss", self.loss, METHODS)
        check_choice("loss_impl", self.loss_impl, LOSS_IMPLS)
        for name, default in TRL_LOSS_OPTIONS:
            if getattr(self, name) != default:
                raise ValueError(f"{name}={getattr(self, name)!r} configures TRL's own loss, which PreferenceTrainer "
                                 f"replaces: choose the loss with `loss` and `loss_hparams` instead")
        self.loss_hparams = self._resolve_hparams()
        if self.sync_ref_model and self.is_reference_free:
            raise ValueError(f"sync_ref_model=True: loss={self.loss!r} uses no reference model")
        self.beta = self.loss_hparams.get("beta", 1.0)

    @property
    def is_reference_free(self) -> bool:
        return not needs_reference(self.loss, self.loss_hparams)

    def _resolve_hparams(self) -> dict:
        """loss_hparams merged with TRL's aliases and the method's defaults; unknown or conflicting names raise."""
        defaults = method_defaults(self.loss)
        hparams = dict(self.loss_hparams or {})
        unknown = sorted(set(hparams) - set(defaults))
        if unknown:
            raise TypeError(f"loss_hparams: loss={self.loss!r} has no hyperparameter {unknown}; "
                            f"it takes {sorted(defaults)}")
        for config_name, name, unset in TRL_ALIASES:
            value = getattr(self, config_name)
            if value == unset:
                continue
            if name not in defaults:
                raise ValueError(f"{config_name}={value!r} does not apply to loss={self.loss!r}; "
                                 f"its hyperparameters are {sorted(defaults)}")
            if name in hparams and hparams[name] != value:
                raise ValueError(f"{config_name}={value!r} and loss_hparams[{name!r}]={hparams[name]!r} disagree")
            hparams[name] = value
        return resolved_hparams(self.loss, hparams)


class PreferenceTrainer(DPOTrainer):
    """DPOTrainer (same constructor) whose log-probs and loss come from amapo_kernels; `args` a PreferenceConfig."""

    _tag_names = ["trl", "amapo-kernels"]
    _name = "Preference"

    def __init__(self, model, ref_model=None, args: PreferenceConfig | None = None, *rest, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or type(model).__name__
            args = PreferenceConfig(f"{name.split('/')[-1]}-Preference")
        if not isinstance(args, PreferenceConfig):
            raise TypeError(f"args must be a PreferenceConfig (a DPOConfig with the loss of amapo_kernels), "
                            f"got {type(args).__name__}")
        self.reference_free = args.is_reference_free
        if self.reference_free and ref_model is not None:
            raise ValueError(f"ref_model: loss={args.loss!r} is reference-free and uses no reference model")
        asked_precompute = args.precompute_ref_log_probs
        if self.reference_free:
            # DPOTrainer keeps no reference model in memory when reference log-probs are precomputed, and
            # _precompute_ref_logps (below) computes none for a reference-free loss.
            args.precompute_ref_log_probs = True
        try:
            super().__init__(model, ref_model, args, *rest, **kwargs)
        finally:
            args.precompute_ref_log_probs = asked_precompute
        if self._is_vlm:
            raise ValueError("PreferenceTrainer supports causal language models; got a vision-language processor")
        if self.reference_free:
            self.precompute_ref_logps = False
            assert self.ref_model is None, "a reference-free loss must not build a reference model"
        self._add_heads()

    def _add_heads(self) -> None:
        """The fused log-probs head on the policy and the reference model (idempotent: DPOTrainer precomputes
        reference log-probs inside its constructor)."""
        if self.args.loss_impl == "fused":
            for model in (self.model, self.ref_model):
                if model is not None:
                    _add_sequence_logps_head(model)

    # -- reference log-probs ------------------------------------------------------------------------------

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        if self.reference_free:
            return dataset
        self._add_heads()
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def compute_ref_log_probs(self, model, inputs):
        """(chosen, rejected) reference log-probs of a batch, by this library: `model` is the reference model,
        or the policy with its PEFT adapter disabled (TRL's rule)."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              adapter, self.accelerator.autocast()):
            logps = self._sequence_logps(model, inputs)
        return logps.chunk(2)

    def _reference_logps(self, model, inputs) -> dict:
        if self.reference_free:
            return {}
        if self.precompute_ref_logps:
            chosen, rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            chosen, rejected = self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else model,
                                                          inputs)
        return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

    # -- the loss -----------------------------------------------------------------------------------------

    def _sequence_logps(self, model, inputs) -> torch.Tensor:
        """[2B] log-probs of the completions (chosen rows first), summed or length-normalized per the method."""
        model_kwargs = {k: v for k, v in inputs.items()
                        if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        average = uses_mean_logps(self.args.loss)
        if self.args.loss_impl == "fused":
            logps = model(**model_kwargs, preference_labels=labels, average_logps=average)
            if not isinstance(logps, torch.Tensor):  # a forward that ignored preference_labels: never silently
                raise TypeError(f"the model's forward returned {type(logps).__name__}, not the log-probs of "
                                f"loss_impl='fused': was it replaced after PreferenceTrainer was built?")
            return logps
        logits = model(**model_kwargs, use_cache=False).logits
        return ak.sequence_logps(logits, labels, shift=True, average=average)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        logps = self._sequence_logps(model, inputs)
        chosen, rejected = logps.chunk(2)
        references = self._reference_logps(model, inputs)
        stats = {}
        if self.args.loss == "amapo":
            loss, stats = ak.amapo_loss(chosen, rejected, **self.args.loss_hparams, return_stats=True)
        else:
            loss = ak.preference_loss(chosen, rejected, method=self.args.loss, **references, **self.args.loss_hparams)
        self._record_metrics(mode, inputs, chosen.detach(), rejected.detach(), references, stats)
        if return_outputs:  # as DPOTrainer: the logits for compute_metrics come from an extra forward
            with torch.no_grad():
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            return loss, outputs
        return loss

    def _record_metrics(self, mode, inputs, chosen, rejected, references, stats) -> None:
        """TRL's metric names over every rank's pairs, plus AMaPO's batch statistics."""
        gather, metrics = self.accelerator.gather, self._metrics[mode]
        chosen_reward, rejected_reward = self.args.beta * chosen, self.args.beta * rejected
        if references:
            chosen_reward = chosen_reward - self.args.beta * references["ref_chosen_logps"].to(chosen)
            rejected_reward = rejected_reward - self.args.beta * references["ref_rejected_logps"].to(rejected)
        chosen_reward, rejected_reward = gather(chosen_reward), gather(rejected_reward)
        metrics["rewards/chosen"].append(chosen_reward.mean().item())
        metrics["rewards/rejected"].append(rejected_reward.mean().item())
        metrics["rewards/accuracies"].append((chosen_reward > rejected_reward).float().mean().item())
        metrics["rewards/margins"].append((chosen_reward - rejected_reward).mean().item())
        metrics["logps/chosen"].append(gather(chosen).mean().item())
        metrics["logps/rejected"].append(gather(rejected).mean().item())
        if stats:  # already over every rank's pairs
            metrics["batch_margin_mean"].append(stats["batch_margin_mean"].item())
            metrics["batch_margin_std"].append(stats["batch_margin_std"].item())
            metrics["adaptive_margin"].append(gather(stats["adaptive_margin"]).mean().item())
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]


def _add_sequence_logps_head(model) -> None:
    """Let `model(..., preference_labels=labels, average_logps=bool)` return the [B] sequence log-probs of
    `labels` through sequence_logps_from_hidden, inside the model's own forward: DDP and DeepSpeed see an
    ordinary forward, and under ZeRO-3 the lm_head weight is an external parameter of the module that is
    called, gathered by its hooks for the forward and again for the backward (which recomputes the tiles).
    Without `preference_labels` the forward is the previous one. With PEFT the base model is patched."""
    root = model
    patched = model.get_base_model() if is_peft_model(model) else model
    if getattr(patched, "_preference_logps_head", False):
        return
    softcap = fused_logit_softcap(patched, "loss_impl")
    head = patched.get_output_embeddings()
    if is_deepspeed_zero3_enabled():
        import deepspeed

        for parameter in (head.weight, head.bias):
            if parameter is not None:
                deepspeed.zero.register_external_parameter(root, parameter)
    previous = patched.forward

    @functools.wraps(type(patched).forward)
    def forward(self, *args, preference_labels=None, average_logps=False, **kwargs):
        if preference_labels is None:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        lm_head = self.get_output_embeddings()
        return ak.sequence_logps_from_hidden(hidden, lm_head.weight, preference_labels.to(hidden.device),
                                             bias=lm_head.bias, shift=True, average=average_logps,
                                             logit_softcap=softcap)

    patched.forward = types.MethodType(forward, patched)
    patched._preference_logps_head = True
