"""Batched generation for AlpacaEval 2 and MT-Bench, with the decoding settings of the AMaPO paper.

Presets (``PRESETS``, ``amapo-eval generate --preset NAME``) are the per-setting AlpacaEval 2 decoding of
the authors' files (github Shiroha-Offical/AMaPO, ``eval/alpacaeval2/configs/``: ``Llama-3-Base-8B-AMaPO.yaml``,
``Llama-3-Instruct-8B-AMaPO.yaml``, ``Mistral-7B-Base-SFT-AMaPO.yaml``, ``Mistral-7B-Instruct-AMaPO.yaml``,
the same settings as SimPO's files of those settings): sampling with temperature 0.9
and 4096 new tokens for both Llama-3 settings, 0.7 / 2048 for Mistral-Base, 0.5 / 2048 for
Mistral-Instruct, top-p 1.0 (the Mistral-Instruct file names no top-p: vLLM's default, 1.0). The Llama-3
files also stop at token ids 128001 and 128009, i.e. ``<|end_of_text|>`` and ``<|eot_id|>``
(``stop_tokens``). Those configs render prompts with their own template files; here the tokenizer's chat
template renders them (the models' own templates), which is not checked to be byte-identical.

MT-Bench: FastChat's ``fastchat/llm_judge/common.py`` ``temperature_config`` per question category
(``MTBENCH_TEMPERATURES``; a category not listed gets 0.7 and a temperature below 1e-4 means greedy, as in
its ``gen_model_answer.py``), whose default is 1024 new tokens.

Batching. Prompts of one batch are tokenized one by one (the special-token rule of the training data,
``amapo_train.data.prompt_needs_special_tokens``) and padded on the LEFT, so that every row's new tokens
start at the same position; the attention mask hides the padding (Hugging Face ``generate`` derives the
positions from it). Greedy output therefore does not depend on the batch size. A sampled output does:
the RNG is seeded once per batch (``seed + index of the batch's first item``), written beside the output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from amapo_train.data import prompt_needs_special_tokens

PRESETS = {
    "llama3-8b-base": {"temperature": 0.9, "max_new_tokens": 4096, "top_p": 1.0,
                       "stop_tokens": ["<|end_of_text|>", "<|eot_id|>"],
                       "source": "Shiroha-Offical/AMaPO eval/alpacaeval2/configs/Llama-3-Base-8B-AMaPO.yaml"},
    "llama3-8b-instruct": {"temperature": 0.9, "max_new_tokens": 4096, "top_p": 1.0,
                           "stop_tokens": ["<|end_of_text|>", "<|eot_id|>"],
                           "source": "Shiroha-Offical/AMaPO eval/alpacaeval2/configs/Llama-3-Instruct-8B-AMaPO.yaml"},
    "mistral-7b-base": {"temperature": 0.7, "max_new_tokens": 2048, "top_p": 1.0, "stop_tokens": [],
                        "source": "Shiroha-Offical/AMaPO eval/alpacaeval2/configs/Mistral-7B-Base-SFT-AMaPO.yaml"},
    "mistral-7b-instruct": {"temperature": 0.5, "max_new_tokens": 2048, "top_p": 1.0, "stop_tokens": [],
                            "source": "Shiroha-Offical/AMaPO eval/alpacaeval2/configs/Mistral-7B-Instruct-AMaPO.yaml"},
}
# Without a preset: the earlier defaults of `amapo-eval generate`.
DEFAULT_DECODING = {"temperature": 0.7, "max_new_tokens": 512, "top_p": 1.0, "stop_tokens": []}

MTBENCH_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
MTBENCH_DEFAULT_TEMPERATURE = 0.7
MTBENCH_MAX_NEW_TOKENS = 1024
GREEDY_BELOW = 1e-4  # FastChat: do_sample = temperature >= 1e-4


def mtbench_temperature(category: str | None) -> float:
    return MTBENCH_TEMPERATURES.get(category, MTBENCH_DEFAULT_TEMPERATURE)


def stop_token_ids(tokenizer, stop_tokens: Sequence[str]) -> list[int]:
    """The tokenizer's EOS id plus the ids of ``stop_tokens``; a stop token the vocabulary lacks is an
    error (a preset meant for another model family), not silently dropped."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    vocab = tokenizer.get_vocab()
    missing = [token for token in stop_tokens if token not in vocab]
    if missing:
        raise ValueError(f"the tokenizer has no stop token {', '.join(missing)} (the preset is for another "
                         "model family: use this model's preset, or --temperature/--top-p/--max-new-tokens alone)")
    ids += [vocab[token] for token in stop_tokens if vocab[token] not in ids]
    return ids


def left_padded(tokenizer, prompts: Sequence[str], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` [B, L] of ``prompts``, each tokenized alone, padded on the left."""
    rows = [tokenizer(text, add_special_tokens=prompt_needs_special_tokens(tokenizer, text))["input_ids"]
            for text in prompts]
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad_id] * (length - len(row)) + row for row in rows], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows], dtype=torch.long)
    return input_ids, attention_mask


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: Sequence[str], *, temperature: float, top_p: float,
                   max_new_tokens: int, stop_ids: Sequence[int], seed: int) -> list[str]:
    """One ``model.generate`` call over ``prompts`` (left-padded); each answer is cut at its first stop
    token and decoded without special tokens. ``temperature < 1e-4`` is greedy."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad a batch with")
    input_ids, attention_mask = left_padded(tokenizer, prompts, pad_id)
    kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_id}
    if stop_ids:
        kwargs["eos_token_id"] = list(stop_ids)
    if temperature >= GREEDY_BELOW:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
    answers = []
    for row in out[:, input_ids.shape[1]:].tolist():
        cut = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
        answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return answers
