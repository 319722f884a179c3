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
  defines, computed inside the model's forward so DDP, DeepSpeed and FSDP2 see an ordinary forward.
- MoE models (a config with `output_router_logits`): the router load-balancing loss of the model's family,
  weighted by `router_aux_loss_coef`, is added to the loss and logged as `aux_loss`, as DPOTrainer does.
- `disable_dropout` (on by default) turns off every dropout of the model and the reference model, also the rates
  transformers' modules keep for functional dropout (Llama's attention_dropout, OPT's), which DPOTrainer leaves on.
- Reference-free methods (amapo, simpo, cpo, slic's rank form) build no reference model; the others use TRL's
  precomputed reference log-probs (the default here) or TRL's live reference model, computed by this library.
- AMaPO's batch statistics span every rank (amapo_loss all-reduces them when torch.distributed is initialized).
  alpha_dpo with `decay` > 0 keeps running statistics (RunningStatisticsCallback), saved in every checkpoint's
  trainer_state.json and read back by a resumed run; evaluation reads them without updating them.
- Logged: TRL's `rewards/*`, `logps/*` and `num_tokens` (rewards = beta x the method's log-probs, minus the
  reference's where there is one; alpha_dpo's those of its implicit reference), plus AMaPO's
  `batch_margin_mean`, `batch_margin_std`, `adaptive_margin`.
  TRL's `entropy`, `logits/*` and `mean_token_accuracy` need the logits the fused path never builds: not logged.
"""

import contextlib
import functools
import inspect
import json
import os
import sys
import types
import unittest.mock
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    from accelerate.utils import is_peft_model
    from datasets import IterableDataset
    from datasets.fingerprint import Hasher
    from transformers import ProcessorMixin
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    from transformers.trainer_callback import ExportableState, TrainerCallback
    from transformers.training_args import _convert_str_dict
    from trl import DPOConfig, DPOTrainer
    from trl.trainer import dpo_trainer as trl_dpo_trainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("amapo_kernels.integrations.trl needs TRL 1.16: pip install 'amapo-kernels[trl]'") from error

import amapo_kernels as ak
from amapo_kernels._checks import check_choice
from amapo_kernels.batch_statistics import RunningStatistics
from amapo_kernels.integrations.hf_head import (disable_dropout, fused_logit_softcap, head_copies, logits_module,
                                                router_loss_function)
from amapo_kernels.preference import (METHODS, keeps_running_statistics, logged_rewards, method_defaults,
                                      needs_reference, resolved_hparams, statistics_pool_error, uses_mean_logps)

LOSS_IMPLS = ("fused", "ops")
# ODPO's per-pair scores would need dataset columns TRL's collator does not carry.
UNSUPPORTED_METHODS = {"odpo": "it needs per-pair scores (chosen_scores / rejected_scores), which TRL's collator drops"}
# TRL's names for hyperparameters of this library's methods: (PreferenceConfig field, hyperparameter, unset value).
TRL_ALIASES = (("beta", "beta", None), ("label_smoothing", "label_smoothing", 0.0),
               ("amapo_variant", "variant", None), ("amapo_ablation", "ablation", None))
# PEFT prompt learning that keeps the sequence (its virtual tokens are a KV prefix); the others prepend them.
KV_PREFIX_ADAPTERS = ("PREFIX_TUNING", "CARTRIDGE")
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
                          "After construction, the beta the logged rewards are scaled by (None for a method "
                          "without one: its rewards are unscaled)."},
    )
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={"help": "Reference methods: compute the reference log-probs once before training (TRL's "
                          "option, on by default here). Reference-free methods never use a reference model."},
    )

    def __post_init__(self):
        self.loss_hparams = _hparams_dict(self.loss_hparams)  # before DPOConfig, whose JSON errors name no field
        super().__post_init__()
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
        if self.sync_ref_model and self.precompute_ref_log_probs:  # DPOTrainer's error comes after tokenization
            raise ValueError("sync_ref_model=True updates the reference model, whose log-probs "
                             "precompute_ref_log_probs (True by default here, unlike DPOConfig) computes once: "
                             "set precompute_ref_log_probs=False")
        self._mirror_aliases()

    def _mirror_aliases(self) -> None:
        """TRL's alias fields (beta, label_smoothing, amapo_variant, amapo_ablation) take the resolved values, so
        that a field set after construction, back to its unset value too (`args.label_smoothing = 0.0`), differs
        from loss_hparams and is refused by the trainer's check, not passed over. beta is None for a method without
        one (its rewards are unscaled): a value there would be refused when the config is built again
        (dataclasses.replace, a to_dict() round trip)."""
        defaults = method_defaults(self.loss)
        for config_name, name, _ in TRL_ALIASES:
            if name in defaults or config_name == "beta":
                setattr(self, config_name, self.loss_hparams.get(name))
        self._aliases_mirrored = True

    @property
    def is_reference_free(self) -> bool:
        return not needs_reference(self.loss, self.loss_hparams)

    def _resolve_hparams(self) -> dict:
        """loss_hparams merged with TRL's aliases and the method's defaults; unknown or conflicting names raise."""
        defaults = method_defaults(self.loss)
        hparams = dict(self.loss_hparams)
        unknown = sorted(set(hparams) - set(defaults))
        if unknown:
            raise TypeError(f"loss_hparams: loss={self.loss!r} has no hyperparameter {unknown}; "
                            f"it takes {sorted(defaults)}")
        for config_name, name, unset in TRL_ALIASES:
            value = getattr(self, config_name)
            # unset means "the method's value" at construction; after it, the field mirrors loss_hparams
            if value == unset and (name not in defaults or not getattr(self, "_aliases_mirrored", False)):
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
    # DPOTrainer's is the DPO paper, which the model card of every checkpoint would cite as the method trained
    _paper = {}

    def __init__(self, model, ref_model=None, args: PreferenceConfig | None = None, *rest, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or type(model).__name__
            args = PreferenceConfig(f"{name.split('/')[-1]}-Preference")
        if not isinstance(args, PreferenceConfig):
            raise TypeError(f"args must be a PreferenceConfig (a DPOConfig with the loss of amapo_kernels), "
                            f"got {type(args).__name__}")
        # fields set after construction (args.beta = ..., as with a DPOConfig) must agree with loss_hparams, which
        # the loss reads: checked again, before anything is tokenized
        args.loss_hparams = args._resolve_hparams()
        self.reference_free = args.is_reference_free
        if self.reference_free and ref_model is not None:
            raise ValueError(f"ref_model: loss={args.loss!r} is reference-free and uses no reference model")
        passed = inspect.signature(DPOTrainer.__init__).bind(self, model, ref_model, args, *rest, **kwargs).arguments
        if isinstance(passed.get("processing_class"), ProcessorMixin):  # as DPOTrainer tells a VLM: before it
            # tokenizes and precomputes the reference log-probs (the check after the constructor, for a processor
            # loaded by name, came after that whole pass)
            raise ValueError("PreferenceTrainer supports causal language models; got a vision-language processor")
        if args.loss_impl == "fused":  # a head the fused path cannot apply, refused before the tokenization
            for network in (model, ref_model):
                if network is not None and not isinstance(network, str):
                    fused_logit_softcap(network.get_base_model() if is_peft_model(network) else network,
                                        "loss_impl")
        _check_peft_adapter(model, passed.get("peft_config"))
        _check_reference_source(model, ref_model, args, passed.get("peft_config"))
        _check_statistics_pool(args, passed.get("eval_dataset") is not None)
        asked_precompute = args.precompute_ref_log_probs
        if self.reference_free:
            # DPOTrainer keeps no reference model in memory when reference log-probs are precomputed, and
            # _precompute_ref_logps (below) computes none for a reference-free loss.
            args.precompute_ref_log_probs = True
        # DPOTrainer keys the precomputed reference log-probs by a hash of every weight, copied to the CPU (seconds
        # per billion parameters, on every rank); a reference-free loss precomputes nothing, so it needs no key.
        no_hash = (unittest.mock.patch.object(trl_dpo_trainer, "hash_module", lambda module: None)
                   if self.reference_free else contextlib.nullcontext())
        try:
            with no_hash:
                super().__init__(model, ref_model, args, *rest, **kwargs)
        finally:
            args.precompute_ref_log_probs = asked_precompute
        if self._is_vlm:
            raise ValueError("PreferenceTrainer supports causal language models; got a vision-language processor")
        if self.reference_free:
            self.precompute_ref_logps = False
            assert self.ref_model is None, "a reference-free loss must not build a reference model"
        self._disable_dropout()
        if keeps_running_statistics(args.loss, args.loss_hparams):
            self.add_callback(RunningStatisticsCallback())
        self._add_heads()

    def _disable_dropout(self) -> None:
        """With disable_dropout, every dropout of the policy and the reference model off: DPOTrainer's walk turns
        off nn.Dropout modules only (Llama's attention_dropout stays). Idempotent: also run before the reference
        precompute, which DPOTrainer's constructor runs."""
        if self.args.disable_dropout:
            for network in (self.model, self.ref_model):
                if network is not None:
                    disable_dropout(network)

    def _add_heads(self) -> None:
        """The fused log-probs head on the policy and the reference model (idempotent: DPOTrainer precomputes
        reference log-probs inside its constructor)."""
        if self.args.loss_impl == "fused":
            for model in (self.model, self.ref_model):
                if model is not None:
                    _add_sequence_logps_head(model)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """DPOTrainer's tokenization, then a map-style dataset left with no example is an error naming it: with
        truncation_mode="keep_start" TRL drops every example whose prompt fills max_length, and a dataset left
        empty failed later, in the reference precompute ("torch.cat(): expected a non-empty list of Tensors"), or
        was evaluated with no metric but its runtime."""
        given = len(dataset) if hasattr(dataset, "__len__") else None
        prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if given and hasattr(prepared, "__len__") and len(prepared) == 0:
            raise ValueError(f"{dataset_name} dataset: none of its {given} examples is left after tokenization: with "
                             f"truncation_mode='keep_start', TRL drops those whose prompt fills max_length="
                             f"{args.max_length}; raise max_length, or shorten those prompts (truncation_mode="
                             f"'keep_end' would keep them, but TRL 1.16 deprecates it)")
        return prepared

    # -- reference log-probs ------------------------------------------------------------------------------

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        if self.reference_free:
            return dataset
        if isinstance(dataset, IterableDataset):  # TRL's error named a flag the user did not set
            raise ValueError(f"{name} dataset: a streaming (iterable) dataset, whose reference log-probs cannot be "
                             "precomputed, and precompute_ref_log_probs is True by default here (False in "
                             "DPOConfig): set precompute_ref_log_probs=False for a live reference model")
        self._add_heads()
        self._disable_dropout()  # else the cached reference log-probs kept functional dropout (attention_dropout)
        # TRL names the cached log-probs after (dataset, reference weights) alone; ours are also summed or
        # length-normalized per the method, computed by loss_impl's path, on sequences the collator truncated
        # (max_length is in no dataset fingerprint with keep_end), under the autocast precision: a cache of other
        # values is no hit.
        model_hash = self._precompute_model_hash
        self._precompute_model_hash = Hasher.hash((model_hash, "amapo_kernels", self.args.loss_impl,
                                                   "mean" if uses_mean_logps(self.args.loss) else "sum",
                                                   self.args.max_length, self.args.truncation_mode,
                                                   str(self.accelerator.mixed_precision)))
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self._precompute_model_hash = model_hash

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        if eval_dataset is not None and not isinstance(eval_dataset, str):  # the constructor checked its own
            _check_statistics_pool(self.args, evaluates=True)
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def compute_ref_log_probs(self, model, inputs):
        """(chosen, rejected) reference log-probs of a batch, by this library: `model` is the reference model,
        or the policy with its PEFT adapter disabled (TRL's rule)."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              adapter, self.accelerator.autocast()):
            logps, _ = self._sequence_logps(model, inputs)
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

    def _sequence_logps(self, model, inputs, aux_loss: bool = False):
        """([2B] log-probs of the completions (chosen rows first), summed or length-normalized per the method;
        the MoE router load-balancing loss with `aux_loss`, else None)."""
        model_kwargs = {k: v for k, v in inputs.items()
                        if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
        if aux_loss:
            model_kwargs["output_router_logits"] = True
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        average = uses_mean_logps(self.args.loss)
        if self.args.loss_impl == "fused":
            outputs = model(**model_kwargs, preference_labels=labels, average_logps=average)
            if not (isinstance(outputs, tuple) and len(outputs) == 2):  # a forward that ignored preference_labels
                raise TypeError(f"the model's forward returned {type(outputs).__name__}, not the log-probs of "
                                f"loss_impl='fused': was it replaced after PreferenceTrainer was built?")
            return outputs
        outputs = model(**model_kwargs, use_cache=False)
        router_loss = getattr(outputs, "aux_loss", None) if aux_loss else None
        if aux_loss and router_loss is None:
            raise ValueError(f"router_aux_loss_coef={self.router_aux_loss_coef}: {type(outputs).__name__} of "
                             f"output_router_logits=True has no aux_loss; set router_aux_loss_coef=0.0")
        return ak.sequence_logps(outputs.logits, labels, shift=True, average=average), router_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        logps, aux_loss = self._sequence_logps(model, inputs, aux_loss=self.aux_loss_enabled)
        chosen, rejected = logps.chunk(2)
        references = self._reference_logps(model, inputs)
        stats = {}
        if self.args.loss == "amapo":
            loss, stats = ak.amapo_loss(chosen, rejected, **self.args.loss_hparams, return_stats=True)
        else:
            running = self._running_statistics()
            state = {} if running is None else {"running": running}
            with running.frozen() if running is not None and mode == "eval" else contextlib.nullcontext():
                loss = ak.preference_loss(chosen, rejected, method=self.args.loss, **references,
                                          **self.args.loss_hparams, **state)
        if aux_loss is not None:  # DPOTrainer's MoE term (aux_loss_enabled: the config has output_router_logits)
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._record_metrics(mode, inputs, chosen.detach(), rejected.detach(), references, stats)
        if return_outputs:  # as DPOTrainer: the logits for compute_metrics come from an extra forward
            with torch.no_grad():
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            return loss, outputs
        return loss

    def _running_statistics(self) -> RunningStatistics | None:
        """The loss's running statistics (None if it keeps none), looked up in the callbacks on each call: a resume
        with restore_callback_states_from_checkpoint replaces the callback by a new one."""
        if not keeps_running_statistics(self.args.loss, self.args.loss_hparams):
            return None
        callbacks = self.callback_handler.callbacks
        # None where the user removed it: preference_loss then names the missing running=
        return next((cb.running for cb in callbacks if isinstance(cb, RunningStatisticsCallback)), None)

    def _record_metrics(self, mode, inputs, chosen, rejected, references, stats) -> None:
        """TRL's metric names over every rank's pairs, plus AMaPO's batch statistics."""
        gather, metrics = self.accelerator.gather, self._metrics[mode]
        chosen_reward, rejected_reward = (
            gather(logged_rewards(self.args.loss, self.args.loss_hparams, logps, references.get(f"ref_{side}_logps")))
            for side, logps in (("chosen", chosen), ("rejected", rejected)))
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


class RunningStatisticsCallback(TrainerCallback, ExportableState):
    """Carries a loss's RunningStatistics (alpha_dpo with decay > 0) in trainer_state.json's stateful_callbacks,
    which the Trainer writes into every checkpoint (state()). A resumed run reads it back at on_train_begin: the
    Trainer itself restores callbacks only with restore_callback_states_from_checkpoint=True (building a new one
    from state()'s args, which this one's constructor takes)."""

    def __init__(self, mean: float = 0.0, std: float = 0.0):
        self.running = RunningStatistics()
        self.running.load_state_dict({"mean": mean, "std": std})

    def state(self) -> dict:
        return {"args": self.running.state_dict(), "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        name = type(self).__name__
        if name in state.stateful_callbacks:  # a fresh run's holds this state; a resumed one's, the checkpoint's
            self.running.load_state_dict(state.stateful_callbacks[name]["args"])
        else:  # resumed from a checkpoint without it (its run's decay was 0): the Trainer's save looks it up
            if state.global_step > 0:
                warnings.warn(f"resumed at step {state.global_step} from a checkpoint without running statistics "
                              f"(its run had decay=0?): loss={args.loss!r} starts them from 0", stacklevel=2)
            state.stateful_callbacks[name] = self.state()


def _hparams_dict(value) -> dict:
    """`loss_hparams` as a dict: None is {}, text (the command line) is parsed as TrainingArguments parses its
    dict fields (JSON, then _convert_str_dict); anything else raises, naming the field."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"loss_hparams must be a JSON object, e.g. '{{\"beta\": 2.5}}'; "
                             f"got {value!r} ({error})") from None
        if isinstance(value, dict):
            value = _convert_str_dict(value)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"loss_hparams must be a dict (a JSON object on the command line), "
                        f"got {type(value).__name__} {value!r}")
    return value


def _check_statistics_pool(args: PreferenceConfig, evaluates: bool) -> None:
    """amapo's and alpha_dpo's z-scores need two pairs or more in one micro-batch of every process
    (preference.statistics_pool_error): raise, naming the batch size, before anything is tokenized or
    precomputed (the paper's recipe, per_device_train_batch_size=1, on one process would otherwise train AMaPO
    without its margin)."""
    sizes = {f"per_device_train_batch_size={args.per_device_train_batch_size}": args.per_device_train_batch_size}
    eval_sizes = ({f"per_device_eval_batch_size={args.per_device_eval_batch_size}": args.per_device_eval_batch_size}
                  if evaluates else {})
    error = statistics_pool_error(args.loss, args.loss_hparams, sizes, args.world_size, eval_sizes)
    if error:
        raise ValueError(error)


def _check_reference_source(model, ref_model, args: PreferenceConfig, peft_config) -> None:
    """Without ref_model, PEFT (its adapter disabled) or precomputed log-probs (outside FSDP), DPOTrainer builds the
    reference model from the policy's name or path: a model built in memory has none, and TRL failed with "Repo id
    must use alphanumeric chars ...: ''". Raise naming the ways out instead, before anything is tokenized."""
    in_memory = not isinstance(model, str) and not getattr(model.config, "_name_or_path", "")
    fsdp = bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")  # accelerate's
    loads_reference = not args.precompute_ref_log_probs or fsdp
    if (in_memory and loads_reference and ref_model is None and peft_config is None and not is_peft_model(model)
            and not args.is_reference_free):
        raise ValueError(f"ref_model: loss={args.loss!r} needs a reference model, which DPOTrainer builds from the "
                         "policy's name or path, and this model (built in memory) has none: pass ref_model= (a copy "
                         "of the model before training), or precompute_ref_log_probs=True (the default here) "
                         "outside FSDP, or a model name or path")


def _check_peft_adapter(model, peft_config) -> None:
    """Prompt tuning, p-tuning and the like prepend virtual tokens to the sequence, which the log-probs of this
    library (one position per label) do not expect: raise before DPOTrainer precomputes anything."""
    configs = [peft_config] if peft_config is not None else []
    if not isinstance(model, str) and is_peft_model(model):  # a PeftModel passed in (a name is loaded bare)
        configs += list(model.peft_config.values())
    for config in configs:
        kind = str(getattr(getattr(config, "peft_type", None), "value", ""))
        if getattr(config, "is_prompt_learning", False) and kind not in KV_PREFIX_ADAPTERS:
            raise ValueError(f"peft_config: {kind} adapters prepend virtual tokens to the sequence, which "
                             f"PreferenceTrainer does not support; use LoRA or prefix tuning")


def _add_sequence_logps_head(model) -> None:
    """Let `model(..., preference_labels=labels, average_logps=bool)` return ([B] sequence log-probs of
    `labels` through sequence_logps_from_hidden, the router load-balancing loss or None), the latter with
    `output_router_logits=True` (MoE models), inside the model's own forward: DDP and DeepSpeed see an
    ordinary forward, and under ZeRO-3 the lm_head weight is an external parameter of the module that is
    called, gathered by its hooks for the forward and again for the backward (which recomputes the tiles).
    Under FSDP2 the lm_head's unit gathers it for the call (_head_method: a registered forward method of a unit of
    its own, the hooks of a unit it shares or of the root's).
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
    patched._forward_without_preference_logps = patched.forward  # an attribute: a deep copy calls its own

    def preference_logps(self, hidden, labels, average):  # a method of the output embeddings: _head_method
        return ak.sequence_logps_from_hidden(hidden, self.weight, labels, bias=self.bias, shift=True, average=average,
                                             logit_softcap=softcap)

    @functools.wraps(type(patched).forward)
    def forward(self, *args, preference_labels=None, average_logps=False, **kwargs):
        if preference_labels is None:
            return self._forward_without_preference_logps(*args, **kwargs)
        kwargs["use_cache"] = False
        outputs = self.base_model(*args, **kwargs)
        hidden, lm_head = outputs.last_hidden_state, _head_method(self.get_output_embeddings(), preference_logps)
        logps = lm_head.preference_logps(hidden, preference_labels.to(hidden.device), average_logps)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            router_loss = router_loss_function(self, "router_aux_loss_coef",
                                               "set router_aux_loss_coef=0.0 or use loss_impl='ops'")
            aux_loss = router_loss(getattr(outputs, "router_logits", None), kwargs.get("attention_mask"))
        return logps, aux_loss

    patched.forward = types.MethodType(forward, patched)
    patched._preference_logps_head = True
    for module in (head, *head_copies(head)):  # bound now: a method bound in a compiled forward is a graph break
        _head_method(module, preference_logps)


def _head_method(head, preference_logps):
    """`head` with `preference_logps` bound as its method of that name (bound on first use: a head that replaced
    the patched one, resize_token_embeddings', gets it too), which gathers its parameters where FSDP2 shards them
    in a unit of their own: a forward method of that unit (registered once), so that FSDP gathers them before the
    call and again for its backward, as for the unit's forward; in a unit it shares (accelerate's FSDP2 puts the
    lm_head with the final norm), by that unit's own hooks (_unit_modules); in the root's unit, by the root's.
    PEFT's modules_to_save wrapper gets a method that calls its active copy's, as its forward calls the copy's
    forward: either or both may be units."""
    if "preference_logps" not in vars(head):
        if logits_module(head) is not head:
            preference_logps = functools.partial(_active_copy_logps, preference_logps=preference_logps)
        head.preference_logps = types.MethodType(preference_logps, head)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and isinstance(head, fsdp.FSDPModule) and not getattr(head, "_preference_logps_fsdp", False):
        if _unit_modules(head) == 1:
            fsdp.register_fsdp_forward_method(head, "preference_logps")
        head._preference_logps_fsdp = True
    return head


def _unit_modules(head) -> int:
    """How many modules the FSDP2 unit of `head` groups (fully_shard of a list). A grouped unit, as accelerate's
    final norm and lm_head, is gathered by the forward of its module that runs first (the norm, before the head)
    and kept for the head's call by accelerate's reshard_after_forward=False, so the head's method is not
    registered there: re-running the unit's hooks from it crashed torch 2.11 in the backward (a segfault, on 2 CPU
    processes; torch 2.14 ran it). Where the weight is not gathered, the fused path stops with the DTensor
    TypeError. Read from FSDP2's state, which has no public accessor for it."""
    return len(getattr(head._get_fsdp_state(), "_modules", (head,)))


def _active_copy_logps(wrapper, hidden, labels, average, *, preference_logps):
    """The preference_logps method of PEFT's modules_to_save `wrapper`: that of the copy its forward would call
    now (the active adapter's; the original with the adapter disabled, a DPO reference's pass)."""
    return _head_method(logits_module(wrapper), preference_logps).preference_logps(hidden, labels, average)
