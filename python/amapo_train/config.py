"""Training configuration: one dataclass, read from a recipe YAML and overridden from the command line."""

import dataclasses
import os
from pathlib import Path

import yaml

from amapo_kernels.preference import METHODS

RECIPES = Path(__file__).parent / "recipes"
CONFIGS = Path(__file__).parent / "configs"
LOSS_IMPLS = ("fused", "ops", "eager")


@dataclasses.dataclass
class TrainConfig:
    # model: a Hub name or local path, or "tiny" (random Llama, tokenizer trained on the bundled data)
    model: str = "tiny"
    # data: "bundled:hh-rlhf", a Hub dataset name, or a local .json/.jsonl(.gz) file
    dataset: str = "bundled:hh-rlhf"
    dataset_format: str = "auto"  # auto | ultrafeedback | hh-rlhf | pairs
    train_split: str = "train"
    test_split: str = "test"
    max_train_pairs: int | None = None
    max_test_pairs: int | None = None
    max_length: int = 2048
    max_prompt_length: int = 1800
    # loss
    loss: str = "amapo"
    loss_impl: str = "fused"  # fused (from hidden states, on GPU) | ops (from logits) | eager (plain torch)
    hparams: dict = dataclasses.field(default_factory=dict)  # e.g. {beta: 3.0} (defaults: the method's paper)
    # optimisation
    learning_rate: float = 6e-7
    total_batch_size: int = 128  # per_device_batch_size x gradient accumulation x world size
    per_device_batch_size: int = 2
    epochs: int = 1
    max_steps: int | None = None  # cap on optimizer steps (the tiny default and tests)
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    seed: int = 42
    bf16: bool = False
    gradient_checkpointing: bool = False
    deepspeed: str | None = None  # "zero3", "zero2" or a path to a DeepSpeed JSON config
    # output
    output_dir: str = "runs/tiny-amapo"
    save_steps: int | None = None  # also at the end
    log_with: str = "tensorboard"  # tensorboard | wandb | none
    eval_batch_size: int = 8
    device: str | None = None  # None: accelerate's choice (GPU if present)

    def validate(self, world_size: int = 1) -> None:
        if self.loss not in METHODS:
            raise ValueError(f"loss must be one of {list(METHODS)}, got {self.loss!r}")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        self.gradient_accumulation_steps(world_size)

    def gradient_accumulation_steps(self, world_size: int = 1) -> int:
        per_step = self.per_device_batch_size * world_size
        if self.total_batch_size % per_step:
            raise ValueError(
                f"total_batch_size {self.total_batch_size} is not a multiple of per_device_batch_size "
                f"{self.per_device_batch_size} x world size {world_size}"
            )
        return self.total_batch_size // per_step

    def deepspeed_config_path(self) -> str | None:
        if self.deepspeed in (None, "", "none"):
            return None
        named = CONFIGS / f"ds_{self.deepspeed}.json"
        return str(named) if named.exists() else self.deepspeed

    @classmethod
    def from_recipe(cls, recipe: str | os.PathLike, **overrides) -> "TrainConfig":
        """A recipe by name (recipes/NAME.yaml) or path; keys are this class's fields."""
        path = Path(recipe)
        if not path.exists():
            path = RECIPES / f"{recipe}.yaml"
        if not path.exists():
            names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
            raise ValueError(f"no recipe {recipe!r}: give a YAML path or one of {names}")
        values = yaml.safe_load(path.read_text()) or {}
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"recipe {path} has unknown keys {unknown}")
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)
