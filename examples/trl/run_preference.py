"""Preference training with amapo_kernels inside TRL's trainer, alignment-handbook style: one YAML recipe holds
the script, training (PreferenceConfig) and model arguments; command-line flags override it.

    accelerate launch --config_file examples/trl/accelerate_zero3.yaml examples/trl/run_preference.py \
        --config examples/trl/amapo-llama3-8b-base.yaml

TRL 1.16's scripts/dpo.py with PreferenceTrainer for DPOTrainer: the same model loading (model_init_kwargs,
--load_in_4bit / --load_in_8bit, PEFT), datasets (--dataset_name with --dataset_streaming, or a `datasets`
mixture), --resume_from_checkpoint and Hub push.
"""

import sys

import transformers
import yaml
from accelerate.logging import get_logger
from datasets import load_dataset
from packaging.version import Version
from trl import (DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser, get_dataset, get_peft_config,
                 get_quantization_config)

from amapo_kernels.integrations.trl import PreferenceConfig, PreferenceTrainer
from amapo_train.cli_errors import one_line

logger = get_logger(__name__)


def parse(argv=None):
    """(ScriptArguments, PreferenceConfig, ModelConfig, DatasetMixtureConfig) from `--config RECIPE.yaml` and
    flags."""
    parser = TrlParser((ScriptArguments, PreferenceConfig, ModelConfig, DatasetMixtureConfig))
    return parser.parse_args_and_config(args=argv)


def parse_or_exit(argv=None):
    """parse(), with a configuration error (a recipe that is missing or not YAML, a field that PreferenceConfig or
    TrainingArguments refuses) said in one line with exit status 2, as argparse says an unknown flag: parsing
    only reads the recipe and the flags, so every error there is the user's."""
    try:
        return parse(argv)
    except (OSError, ValueError, TypeError, yaml.YAMLError) as error:
        print(f"run_preference.py: error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    script_args, training_args, model_args, dataset_args = parse_or_exit(argv)
    # TRL's defaults from the model arguments, then what the recipe or the command line set in model_init_kwargs
    model_init_kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
                             attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    if dataset_args.datasets:
        if script_args.dataset_name:
            logger.warning("Both `datasets` and `dataset_name` are provided. The `datasets` argument will be used to "
                           "load the dataset and `dataset_name` will be ignored.")
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config,
                               streaming=script_args.dataset_streaming)
    else:
        raise ValueError("Either `datasets` or `dataset_name` must be provided.")

    trainer = PreferenceTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    if script_args.ignore_bias_buffers:  # TRL's torch distributed workaround
        import torch

        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if Version(transformers.__version__) >= Version("5.18.0"):  # finish the trackers, destroy the process group
        trainer.end()
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
