"""Training configuration: one dataclass, read from a recipe YAML and overridden from the command line."""

import dataclasses
import os
import typing
from pathlib import Path

import torch

from amapo_kernels.preference import (METHODS, check_float_range, method_defaults, needs_reference, resolved_hparams,
                                      statistics_pool_error)
from amapo_train.cli_errors import UserError, check_range
from amapo_train.data import FORMATS, check_lengths

RECIPES = Path(__file__).parent / "recipes"
CONFIGS = Path(__file__).parent / "configs"
LOSS_IMPLS = ("fused", "ops", "eager")
TOKENIZATIONS = ("trl", "separate")
CHAT_TEMPLATES = ("mistral",)
TRACKERS = ("tensorboard", "wandb", "none")
# Learning-rate schedules after the linear warm-up (transformers.get_scheduler's names): the recipes' cosine to 0,
# linear to 0, or constant.
LR_SCHEDULERS = ("cosine", "linear", "constant_with_warmup")
# The driver's devices: accelerate places each process on its GPU (LOCAL_RANK; CUDA_VISIBLE_DEVICES picks which)
DEVICES = ("cpu", "cuda")
DATASET_FORMATS = ("auto", *FORMATS)  # detection per record, or one format of amapo_train.data
# Hyperparameters that come from the data (one value per pair), not from --hparam: method -> {name: flag}.
DATA_HPARAMS = {"odpo": {"chosen_scores": "--chosen-score-column", "rejected_scores": "--rejected-score-column"}}
# The score columns ODPO reads when no flag names them (UltraFeedback-binarized's).
DEFAULT_SCORE_COLUMNS = ("score_chosen", "score_rejected")
# The values each numeric field takes, (lowest, highest), None: no bound; an unset optional field (None) is not
# checked. 0 turns off max_grad_norm, save_steps, save_total_limit and eval_steps; max_steps and the max_*_pairs
# caps are left unset for "no cap" (a 0 would read as no cap, not as nothing). The seed feeds numpy's 32-bit one.
NUMBER_RANGES = {
    "learning_rate": (0, None), "total_batch_size": (1, None), "per_device_batch_size": (1, None),
    "num_processes": (1, None), "epochs": (1, None), "max_steps": (1, None), "warmup_ratio": (0, 1),
    "weight_decay": (0, None), "max_grad_norm": (0, None), "seed": (0, 2**32 - 1), "save_steps": (0, None),
    "save_total_limit": (0, None), "eval_batch_size": (1, None), "eval_steps": (0, None),
    "max_train_pairs": (1, None), "max_test_pairs": (1, None), "router_aux_loss_coef": (0, None),
}
BOOLEANS = {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False}


def attention_implementations() -> list[str]:
    """The attention implementations transformers registers (eager, sdpa, flash_attention_2, ...)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]


def check_attention(name: str | None) -> None:
    """A name transformers knows, or a Hub kernel (org/repo, for transformers' `kernels` integration): checked
    before the model loads; whether the kernel can run here is known when it is set."""
    if name is not None and "/" not in name and name not in attention_implementations():
        raise UserError(f"--attn-implementation must be one of {attention_implementations()} or a Hub kernel "
                        f"(org/repo), got {name!r}")


def settable_hparams(method: str) -> dict:
    """The hyperparameters of `method` a recipe or --hparam may set, with their defaults."""
    return {name: value for name, value in method_defaults(method).items()
            if name not in DATA_HPARAMS.get(method, {})}


@dataclasses.dataclass
class TrainConfig:
    # model: a Hub name or local path, "tiny" (random Llama, tokenizer trained on the bundled data), or
    # "random:SHAPE" (a random model of a real shape, amapo_train.model.RANDOM_SHAPES)
    model: str = "tiny"
    # data: "bundled:hh-rlhf", a Hub dataset name, or a local .json/.jsonl(.gz) file
    dataset: str = "bundled:hh-rlhf"
    dataset_format: str = "auto"  # one of DATASET_FORMATS (amapo_train.data.FORMATS)
    # held-out data: another source, or a seeded share of the training records (a single local file
    # without either holds out 10%); never the training records themselves
    eval_dataset: str | None = None
    eval_fraction: float | None = None
    # ODPO's per-pair scores (default: UltraFeedback's score_chosen / score_rejected)
    chosen_score_column: str | None = None
    rejected_score_column: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    max_train_pairs: int | None = None
    max_test_pairs: int | None = None
    max_length: int = 2048
    max_prompt_length: int = 1800
    # tokenization: "trl" (the authors' = TRL 0.9's tokenize_row, not TRL 1.16's DPOTrainer: prompt and
    # response tokenized jointly and split, the prompt cut only when the pair overflows) | "separate" (the
    # driver's older rule, see amapo_train.data)
    tokenization: str = "trl"
    chat_template: str | None = None  # "mistral": the authors' override of Mistral-Instruct's template
    insert_system_message: bool = True  # an empty system turn when a chat has none (the authors' default)
    # loss
    loss: str = "amapo"
    loss_impl: str = "fused"  # fused (from hidden states, on GPU) | ops (from logits) | eager (plain torch)
    hparams: dict = dataclasses.field(default_factory=dict)  # e.g. {beta: 3.0} (defaults: the method's paper)
    # a mixture of experts' router load-balancing loss, x this, added to the loss; None: the model's own rule (its
    # config's coefficient where its output_router_logits is on, else none: train.router_loss_weight); 0: none
    router_aux_loss_coef: float | None = None
    # optimisation
    learning_rate: float = 6e-7
    total_batch_size: int = 128  # per_device_batch_size x gradient accumulation x world size
    per_device_batch_size: int = 2
    # the processes the recipe's authors launched: with per_device_batch_size, the pairs over which AMaPO's
    # batch mean and std are taken; a launch with another number is warned about (None: no such recipe)
    num_processes: int | None = None
    epochs: int = 1
    max_steps: int | None = None  # cap on optimizer steps (the tiny default and tests)
    warmup_ratio: float = 0.1
    lr_scheduler: str = "cosine"  # one of LR_SCHEDULERS
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # the authors' (transformers Trainer's) default; 0 or None: off
    seed: int = 42
    bf16: bool = False
    gradient_checkpointing: bool = False
    # dropout off in the model, as the authors' trainer and TRL's DPOTrainer: deterministic log-probs, and a policy
    # that equals its reference (computed in eval mode) at the first step
    disable_dropout: bool = True
    # transformers' attention implementation (attention_implementations()); None: transformers' default
    # (sdpa). The authors ran flash_attention_2 (flash-attn, not a dependency here); Gemma 2 trains with eager.
    attn_implementation: str | None = None
    deepspeed: str | None = None  # "zero3", "zero2" or a path to a DeepSpeed JSON config
    # output
    output_dir: str = "runs/tiny-amapo"
    save_steps: int | None = None  # also at the end
    # the newest step checkpoints kept (their AdamW state: 12 bytes a parameter); None or 0: all
    save_total_limit: int | None = None
    save_final: bool = True  # the final checkpoint (off: a throughput run that keeps no model)
    log_with: str = "tensorboard"  # tensorboard | wandb | none
    eval_batch_size: int = 8
    eval_steps: int | None = None  # held-out loss / reward and ranking accuracy every N steps
    device: str | None = None  # None: accelerate's choice (GPU if present)

    def validate(self, world_size: int = 1) -> None:
        """Checks everything that can be checked before a model or data set is loaded; a UserError names
        the setting and what it accepts."""
        if self.loss not in METHODS:
            raise UserError(f"--loss must be one of {list(METHODS)}, got {self.loss!r}")
        for name in sorted(self.hparams):
            if name in DATA_HPARAMS.get(self.loss, {}):
                raise UserError(f"--hparam {name!r} of {self.loss} comes from the data, one value per pair: "
                                f"name its column with {DATA_HPARAMS[self.loss][name]}")
            if name not in settable_hparams(self.loss):
                raise UserError(f"--hparam {name!r} is not a hyperparameter of {self.loss}; it takes "
                                f"{sorted(settable_hparams(self.loss))}")
        try:  # values too (finite, sign, range, choices), by the library's own rules
            resolved = resolved_hparams(self.loss, self.hparams)
            # and within the range of the dtype the loss computes in (train.py: the policy's log-probs are float32,
            # the reference's float64), else the first step failed on it, after the model and data had loaded
            check_float_range(self.loss, resolved, torch.float64 if needs_reference(self.loss, resolved)
                              else torch.float32)
        except (TypeError, ValueError) as error:
            raise UserError(f"--hparam: {error}") from None
        if (self.chosen_score_column or self.rejected_score_column) and self.loss not in DATA_HPARAMS:
            raise UserError(f"--chosen-score-column / --rejected-score-column are for --loss odpo, not {self.loss}")
        if self.eval_fraction is not None and not 0.0 < self.eval_fraction < 1.0:
            raise UserError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")
        if self.eval_fraction is not None and self.eval_dataset:
            raise UserError("give --eval-dataset or --eval-fraction, not both")
        check_attention(self.attn_implementation)
        for name, value, accepted in (("loss-impl", self.loss_impl, LOSS_IMPLS),
                                      ("tokenization", self.tokenization, TOKENIZATIONS),
                                      ("chat-template", self.chat_template, (None, *CHAT_TEMPLATES)),
                                      ("log-with", self.log_with, TRACKERS),
                                      ("lr-scheduler", self.lr_scheduler, LR_SCHEDULERS),
                                      ("dataset-format", self.dataset_format, DATASET_FORMATS),
                                      ("device", self.device, (None, *DEVICES))):
            if value not in accepted:
                raise UserError(f"--{name} must be one of {list(accepted)}, got {value!r}")
        for name, (low, high) in NUMBER_RANGES.items():
            if getattr(self, name) is not None:
                check_range(f"--{name.replace('_', '-')}", getattr(self, name), low, high)
        check_length_flags(self.max_length, self.max_prompt_length)
        self.gradient_accumulation_steps(world_size)
        self.check_statistics_pool(world_size)
        if self.loss_impl == "fused" and world_size > 1 and not self.deepspeed_config_path():
            # the fused path runs the decoder outside the wrapper's forward: DDP would not sync its gradients
            raise UserError(f"--loss-impl fused with {world_size} processes needs --deepspeed (zero2 or zero3); "
                            "under plain DDP use --loss-impl ops")

    def score_columns(self) -> tuple[str, str] | None:
        """The (chosen, rejected) score columns the loss reads (ODPO), else None."""
        if self.loss not in DATA_HPARAMS:
            return None
        return (self.chosen_score_column or DEFAULT_SCORE_COLUMNS[0],
                self.rejected_score_column or DEFAULT_SCORE_COLUMNS[1])

    def gradient_accumulation_steps(self, world_size: int = 1) -> int:
        per_step = self.per_device_batch_size * world_size
        if self.total_batch_size % per_step:
            raise UserError(
                f"total_batch_size {self.total_batch_size} is not a multiple of per_device_batch_size "
                f"{self.per_device_batch_size} x world size {world_size}"
            )
        return self.total_batch_size // per_step

    def check_statistics_pool(self, world_size: int) -> None:
        """amapo's and alpha_dpo's z-scores span one micro-batch of every process: a batch of one pair there
        (the 8B recipe's one pair per device, launched on one process) would train AMaPO without its margin.
        The held-out loss (every eval_steps) is refused likewise."""
        sizes = {f"--per-device-batch-size {self.per_device_batch_size}": self.per_device_batch_size}
        eval_sizes = {f"--eval-batch-size {self.eval_batch_size}": self.eval_batch_size} if self.eval_steps else {}
        error = statistics_pool_error(self.loss, self.hparams, sizes, world_size, eval_sizes)
        if error:
            raise UserError(error)

    def amapo_stats_pairs(self, world_size: int = 1) -> int:
        """The pairs over which AMaPO's batch mean and std are taken: one micro-batch of every process."""
        return self.per_device_batch_size * world_size

    def optimizer_group_count(self) -> int:
        """AdamW's parameter groups (train.optimizer_groups): with weight decay 2, the decayed parameters and the
        spared biases and norms; without, 1 (so that a checkpoint of such a run keeps its one-group state)."""
        return 2 if self.weight_decay else 1

    def deepspeed_config_path(self) -> str | None:
        if self.deepspeed in (None, "", "none"):
            return None
        named = CONFIGS / f"ds_{self.deepspeed}.json"
        return str(named) if named.exists() else self.deepspeed

    @classmethod
    def from_recipe(cls, recipe: str | os.PathLike, **overrides) -> "TrainConfig":
        """A recipe by name (recipes/NAME.yaml) or path; keys are this class's fields. An override of
        the recipe's `loss` by another method drops the recipe's hparams (they are its method's: a beta
        of AMaPO is no beta of DPO); that method's defaults apply."""
        import yaml

        path = Path(recipe)
        if not path.exists():
            path = RECIPES / f"{recipe}.yaml"
        if not path.exists():
            names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
            raise UserError(f"no recipe {recipe!r}: give a YAML path or one of {names}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise UserError(f"recipe {path}: not readable as YAML: {error}") from None
        if not isinstance(values, dict):
            raise UserError(f"recipe {path}: expected a mapping of keys to values, got a {type(values).__name__}")
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields), key=str)
        if unknown:
            raise UserError(f"recipe {path} has unknown keys {unknown}")
        values = {name: recipe_value(path, fields[name], value) for name, value in values.items()}
        if values.get("hparams"):
            method = values.get("loss", cls.loss)
            values["hparams"] = {name: hparam_value(method, name, value, where=f"recipe {path}: hparams:")
                                 for name, value in values["hparams"].items()}
        overrides = {key: value for key, value in overrides.items() if value is not None}
        if overrides.get("loss", values.get("loss", cls.loss)) != values.get("loss", cls.loss):
            values.pop("hparams", None)
        values.update(overrides)
        return cls(**values)


def check_length_flags(max_length: int, max_prompt_length: int) -> None:
    """data.check_lengths as the console scripts' user error, naming their flags."""
    try:
        check_lengths(max_length, max_prompt_length)
    except ValueError:
        raise UserError(f"--max-prompt-length {max_prompt_length} must lie in [1, --max-length {max_length})") from None


def hparam_value(method: str, name, value, where: str = "--hparam"):
    """`value` (command-line text, or a recipe's YAML value) as the type of the hyperparameter's default: a
    number for a numeric one (YAML reads 1e-2 as text too), on/off for a switch, none (or null) for an option
    whose default is None. Any other value is kept as it is: validate() checks it by the method's rules and
    names the valid hyperparameters."""
    defaults = settable_hparams(method) if method in METHODS else {}
    default = defaults.get(name)
    if not isinstance(value, str):
        return value
    if name in defaults and default is None and value.lower() in ("none", "null"):
        return None  # an option that is off by default (ablation=none), as the command line can say it
    if default is None or isinstance(default, str):
        return value
    try:
        return BOOLEANS[value.lower()] if isinstance(default, bool) else type(default)(float(value))
    except (ValueError, KeyError):
        raise UserError(f"{where} {name}={value}: expected a {type(default).__name__}") from None


def recipe_value(path, field: dataclasses.Field, value):
    """A recipe's `value` for `field` as the field's type, else a UserError naming the recipe and key. YAML
    reads `6e-7` (no dot) and quoted numbers as strings: a string that parses as the number is taken."""
    kinds = typing.get_args(field.type) or (field.type,)
    if value is None and type(None) in kinds:
        return None
    kind = next(k for k in kinds if k is not type(None))
    if isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool):
        return value
    try:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind in (int, float) and isinstance(value, str):
            return kind(value)
        if kind is bool and isinstance(value, str):
            return BOOLEANS[value.lower()]
    except (ValueError, KeyError):
        pass
    expected = {int: "an integer", float: "a number", bool: "on/off (true/false)", str: "a string",
                dict: "a mapping"}[kind]
    raise UserError(f"recipe {path}: {field.name}: expected {expected}, got {value!r}")
