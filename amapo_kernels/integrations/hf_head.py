"""What training through this library must know of a Hugging Face causal LM: what the fused lm_head must know
of its output (the final logit softcap it applies, Gemma 2's `final_logit_softcapping`, and the logit scalings
and vocabulary truncation it does not; for a mixture of experts, the router load-balancing loss its own forward
would add), and where its dropout hides. One place for the TRL integration and amapo-train, so that neither
computes log-probs of logits other than the model's."""

import inspect
import math
import sys

import torch

# Scalings some architectures apply around the lm_head (found by reading transformers' modeling files: Cohere
# multiplies the logits by logit_scale, Granite divides them by logits_scaling, Falcon-H1 multiplies by
# lm_head_multiplier, Inkling divides the hidden states by logits_mup_width_multiplier); the fused path applies
# only a softcap.
LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling",
                "logits_mup_width_multiplier")
# Final logit softcaps, `c * tanh(z / c)` in each modeling file: Gemma 2's name (and most models'), xLSTM's
# (output_logit_soft_cap, 30 by default) and RecurrentGemma's (logits_soft_cap, 30 by default), which the fused
# path applies as logit_softcap.
SOFTCAPS = ("final_logit_softcapping", "output_logit_soft_cap", "logits_soft_cap")
# Config attributes of the above that a model's forward does not apply (read in its modeling file): Gemma 3's
# multimodal model keeps its text config's final_logit_softcapping unapplied; MPT's forward ignores logit_scale.
NOT_APPLIED = {"Gemma3ForConditionalGeneration": ("final_logit_softcapping",), "MptForCausalLM": ("logit_scale",)}
# Models whose logits are the output embeddings of hidden states other than the decoder's last: ProphetNet's
# come from its n-gram predicting stream.
OTHER_HIDDEN_STATES = ("ProphetNetForCausalLM", "XLMProphetNetForCausalLM")


def fused_logit_softcap(model, switch: str) -> float | None:
    """The model's final logit softcap for sequence_logps_from_hidden(logit_softcap=...), None without one
    (SOFTCAPS: Gemma 2's final_logit_softcapping, xLSTM's output_logit_soft_cap).
    A ValueError naming `switch` (the caller's option that chose the fused path) for a model whose config
    scales its logits or drops the lm_head's last rows (Inkling's unpadded_vocab_size), which the fused path
    would leave out."""
    model = getattr(model, "module", model)  # a training wrapper (DeepSpeed's engine, DDP) holds it as .module
    if type(model).__name__ in OTHER_HIDDEN_STATES:
        raise ValueError(f"{switch} 'fused' multiplies the decoder's last hidden states by the output embeddings, "
                         f"but {type(model).__name__} takes its logits from its n-gram predicting stream; use 'ops'")
    text_config = model.config.get_text_config()
    applied = [name for name in (*LOGIT_SCALES, *SOFTCAPS) if name not in NOT_APPLIED.get(type(model).__name__, ())]
    for name in LOGIT_SCALES:
        if name in applied and getattr(text_config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"{switch} 'fused' does not apply the model's {name}={getattr(text_config, name)!r}; "
                             "use 'ops'")
    unpadded, vocab = getattr(text_config, "unpadded_vocab_size", None), getattr(text_config, "vocab_size", None)
    if unpadded is not None and unpadded != vocab:
        raise ValueError(f"{switch} 'fused' does not drop the logits beyond the model's unpadded_vocab_size="
                         f"{unpadded!r} (its lm_head has vocab_size={vocab!r} rows); use 'ops'")
    _check_head_is_the_output_embeddings(model, switch)
    return next((getattr(text_config, name) for name in SOFTCAPS
                 if name in applied and getattr(text_config, name, None) is not None), None)


def _check_head_is_the_output_embeddings(model, switch: str) -> None:
    """The fused path multiplies the decoder's last hidden states by the output embeddings' weight alone. A
    model with another module with parameters beside its decoder and its output embeddings applies it around them
    (ModernBERT-decoder's prediction head, BERT-style `cls.predictions.transform`): its log-probs would be of
    other logits than the model's, so refuse it, naming `switch`. A stand-in without modules is not checked."""
    if not hasattr(model, "get_output_embeddings") or not hasattr(model, "named_children"):
        return
    head, decoder = model.get_output_embeddings(), getattr(model, "base_model", None)
    if decoder is model:  # base_model_prefix names no attribute (Llama 4's, Mllama's text models)
        raise ValueError(f"{switch} 'fused' runs the decoder as the model's base_model, which {type(model).__name__} "
                         f"does not have (base_model_prefix={model.base_model_prefix!r}); use 'ops'")
    for name, child in model.named_children():
        if child is not head and child is not decoder and next(child.parameters(), None) is not None:
            raise ValueError(f"{switch} 'fused' computes the logits as the output embeddings "
                             f"({type(head).__name__}) of the decoder's hidden states, but "
                             f"{type(model).__name__} also applies its {name!r} ({type(child).__name__}); use 'ops'")
    _check_head_is_linear(head, switch)


def _check_head_is_linear(head, switch: str) -> None:
    """The fused path computes `hidden @ head.weight.T + head.bias`: what a head whose forward is nn.Linear's
    computes, and PEFT's modules_to_save copy of one (its weight and bias are the active copy's, the original's
    with the adapter disabled). A PEFT adapter on the lm_head itself (LoRA's, trainable tokens') adds in its
    forward a delta that the weight leaves out: refused, naming `switch`, as any other head."""
    if head is None:
        raise ValueError(f"{switch} 'fused' multiplies the hidden states by the output embeddings' weight, but the "
                         "model's get_output_embeddings() is None; use 'ops'")
    linear = torch.nn.Linear.forward
    if all(type(module).forward is linear for module in head_copies(head)):
        return
    kind = f"{type(head).__module__}.{type(head).__name__}"
    peft_hint = (" (a PEFT adapter on the lm_head: leave the lm_head out of target_modules and "
                 "trainable_token_indices, or train it whole with modules_to_save)") if kind.startswith("peft.") else ""
    raise ValueError(f"{switch} 'fused' computes the logits as the hidden states times the output embeddings' "
                     f"weight, but the output embeddings, a {kind}, compute them in a forward of their own"
                     f"{peft_hint}; use 'ops'")


def logits_module(head):
    """The module whose forward computes the logits: `head`, or for PEFT's modules_to_save wrapper the copy that
    its forward calls (the active adapter's; the original with the adapter disabled), found by PEFT's own lookup:
    the wrapper's `weight` is that copy's. The TRL integration calls a method of that module, so that an FSDP2
    unit of the copy alone (a size-based wrap's) gathers its weight."""
    weight = head.weight
    return next(module for module in head_copies(head) if module.weight is weight)


def head_copies(head) -> tuple:
    """The modules that may compute the logits for the output embeddings `head`: `head`, or the heads between
    which PEFT's modules_to_save wrapper switches (the original, then each adapter's trained copy). An instance
    check (fully_shard subclasses the wrapper), of a class that exists only if peft was imported."""
    peft_modules = sys.modules.get("peft.utils.other")
    if peft_modules is None or not isinstance(head, peft_modules.ModulesToSaveWrapper):
        return (head,)
    return head.original_module, *head.modules_to_save.values()


def router_loss_function(model, switch: str, way_out: str):
    """The MoE router load-balancing loss of `model`'s family as f(router_logits of its decoder, attention_mask):
    transformers' load_balancing_loss_func of its modeling module (what its own forward adds), on the experts of
    its config. TRL's fused lm_head imports Mixtral's, which every causal MoE family of transformers 5 copies
    (Doge's takes its number of keys too). A family without one is a ValueError naming `switch` (the caller's
    option that asked for the loss) and `way_out` (how to go on without it)."""
    model = getattr(model, "module", model)
    function = getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)
    if function is None:
        raise ValueError(f"{switch}: the fused lm_head finds no router load-balancing loss for "
                         f"{type(model).__name__}; {way_out}")
    # the model's own attributes, which its forward passes (PhiMoE's, JetMoE's, DBRX's configs have no num_experts)
    config = model.config.get_text_config()
    experts, top_k = (getattr(model, name, None) or getattr(config, name, None)
                      for name in ("num_experts", "num_experts_per_tok"))
    if experts is None or top_k is None:
        raise ValueError(f"{switch}: the fused lm_head finds no num_experts / num_experts_per_tok on "
                         f"{type(model).__name__} or its config; {way_out}")

    # Doge's takes the number of keys of its product-key routing too: the floor of sqrt(experts), as its forward
    keys = (math.isqrt(experts),) if "num_keys" in inspect.signature(function).parameters else ()

    def router_loss(router_logits, attention_mask):
        if router_logits is None:
            raise ValueError(f"{switch}: {type(model).__name__}'s decoder returned no router logits under "
                             f"output_router_logits=True; {way_out}")
        return function(router_logits, experts, *keys, top_k, attention_mask)

    return router_loss


def disable_dropout(model) -> int:
    """Dropout off in `model`, as the authors' trainer and TRL's DPOTrainer intend (disable_dropout, on by default):
    every dropout module's p set to 0, and every rate a module keeps for functional dropout (transformers' float
    attributes named *dropout* or *pdrop*: Llama's attention_dropout, OPT's dropout and activation_dropout, ...),
    which their nn.Dropout-only walk leaves on. Returns how many were not 0 already."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p:
            module.p, changed = 0.0, changed + 1
        for name, value in list(vars(module).items()):
            if ("dropout" in name or "pdrop" in name) and type(value) in (int, float) and value:
                setattr(module, name, 0.0)
                changed += 1
    return changed
