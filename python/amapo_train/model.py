"""Models and tokenizers: any AutoModelForCausalLM by name or path, the built-in tiny default (a random
Llama with a byte-level BPE tokenizer trained on the bundled data, no download), or `random:SHAPE`, a
randomly initialized model of a real model's shape (RANDOM_SHAPES) with the tiny tokenizer: throughput
and memory at that size, offline and without its weights."""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from amapo_train.cli_errors import UserError, one_line
from amapo_train.data import CHAT_TEMPLATES, load_records

TINY = "tiny"
RANDOM = "random:"
# Shapes for `--model random:NAME` (LlamaConfig arguments). lm_head is untied, as in Llama-3-8B, so the
# fused path's weight is lm_head's own; RoPE keeps transformers' defaults (they do not change the cost).
RANDOM_SHAPES = {
    # Llama-3.2-1B's body and Llama-3's vocabulary: 1.50B parameters with the untied lm_head
    "llama3-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    # Llama-3's vocabulary on a 2-layer, hidden-64 body: the loss side of llama3-1b in seconds on a CPU
    "llama3-vocab-tiny": dict(vocab_size=128256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                              tie_word_embeddings=False),
}
SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}


def train_tiny_tokenizer(texts, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`; every prompt starts with <|bos|>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A ~0.4M-parameter Llama: 2 layers, hidden 64, 4 heads (no dropout, so reruns are exact)."""
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def random_shape(model: str) -> str | None:
    """SHAPE of a `random:SHAPE` model spec (a ValueError for an unknown one), else None."""
    if not model.startswith(RANDOM):
        return None
    shape = model[len(RANDOM):]
    if shape not in RANDOM_SHAPES:
        raise ValueError(f"--model {model}: unknown shape {shape!r}; shapes: {sorted(RANDOM_SHAPES)}")
    return shape


def random_llama(shape: str, tokenizer_size: int, seed: int) -> LlamaForCausalLM:
    """A LlamaForCausalLM of RANDOM_SHAPES[shape], seeded, fp32 (the master copy)."""
    config = LlamaConfig(**RANDOM_SHAPES[shape])
    if tokenizer_size > config.vocab_size:
        raise ValueError(f"random:{shape} has {config.vocab_size} logits, fewer than the tokenizer's {tokenizer_size}")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def with_token_ids(model, tokenizer):
    """`model` with the tokenizer's BOS / EOS / PAD ids in its config and generation config (LlamaConfig's
    defaults, 1 and 2, are the tiny tokenizer's <|eos|> and <|pad|>), so that a saved checkpoint stops
    generating at <|eos|> under plain transformers. Set after the init: the weights (and the embedding's
    padding_idx) stay the seed's."""
    for settings in (model.config, model.generation_config):
        settings.bos_token_id = tokenizer.bos_token_id
        settings.eos_token_id = tokenizer.eos_token_id
        settings.pad_token_id = tokenizer.pad_token_id
    return model


def load_tokenizer(config):
    """The tokenizer of a TrainConfig: the tiny one (trained on the bundled data; also for random:SHAPE), or
    AutoTokenizer.from_pretrained(config.model) with a pad token (its EOS when it has none) and the chat
    template override of `config.chat_template` (the authors' Mistral-Instruct template)."""
    if config.model == TINY or random_shape(config.model):
        records = load_records(config.dataset, config.train_split) if config.dataset.startswith("bundled:") else \
            load_records("bundled:hh-rlhf", "train")
        return train_tiny_tokenizer([record[side] for record in records for side in ("chosen", "rejected")])
    tokenizer = from_pretrained(AutoTokenizer, config.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATES[config.chat_template]
    return tokenizer


def load_model_and_tokenizer(config):
    """(model, tokenizer) for a TrainConfig: the tiny default, or from_pretrained(config.model). The weights
    are fp32 (the master copy AdamW updates); `bf16` runs the forward under bf16 autocast (accelerate's
    mixed precision) or DeepSpeed's bf16, as the authors' Trainer (torch_dtype null) does."""
    tokenizer = load_tokenizer(config)
    if config.model == TINY:
        model = with_token_ids(tiny_llama(len(tokenizer), seed=config.seed), tokenizer)
    elif random_shape(config.model):
        model = with_token_ids(random_llama(random_shape(config.model), len(tokenizer), seed=config.seed), tokenizer)
    else:
        model = from_pretrained(AutoModelForCausalLM, config.model, dtype=torch.float32)
    return with_attention(model, config.attn_implementation), tokenizer


def enable_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer, non-reentrant as the authors' configs ask
    (use_reentrant: False; transformers 4.x defaults to the reentrant form). transformers 5 names it
    activation_checkpointing_enable, gradient_checkpointing_enable being a deprecated alias there."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def with_attention(model, name: str | None):
    """`model` with transformers' attention implementation `name` (None: as loaded, transformers' default). A
    kernel that cannot run here (flash_attention_2 without flash-attn, ...) is an error naming the flag."""
    if name is not None:
        try:
            model.set_attn_implementation(name)
        except (ImportError, ValueError) as error:
            raise UserError(f"--attn-implementation {name}: {one_line(error)}") from None
    return model


def from_pretrained(auto_class, model: str, flag: str = "--model", **kwargs):
    """auto_class.from_pretrained(model): a Hub name that cannot be reached (offline: after huggingface_hub's
    retries), a repository that does not exist, or a directory that holds no model or a damaged one, is a user
    error naming `flag` (the option that named `model`) and why, not a page of traceback."""
    try:
        return auto_class.from_pretrained(model, **kwargs)
    except Exception as error:  # each library its own type: missing or truncated files (OSError, safetensors'
        # SafetensorError, torch.load's UnpicklingError), an unknown or invalid architecture (ValueError,
        # huggingface_hub's validation error), a tokenizer file of another layout (KeyError)
        raise UserError(f"{flag} {model}: cannot be loaded: {one_line(error)}") from error
