"""What the fused lm_head must know of a Hugging Face causal LM's output: the final logit softcap it applies
(Gemma 2's `final_logit_softcapping`), and the logit scalings and vocabulary truncation it does not. One place
for the TRL integration and amapo-train, so that neither computes log-probs of logits other than the model's."""

# Scalings some architectures apply around the lm_head (found by reading transformers' modeling files: Cohere
# multiplies the logits by logit_scale, Granite divides them by logits_scaling, Falcon-H1 multiplies by
# lm_head_multiplier, Inkling divides the hidden states by logits_mup_width_multiplier); the fused path applies
# only a softcap.
LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling",
                "logits_mup_width_multiplier")


def fused_logit_softcap(model, switch: str) -> float | None:
    """The model's final logit softcap for sequence_logps_from_hidden(logit_softcap=...), None without one.
    A ValueError naming `switch` (the caller's option that chose the fused path) for a model whose config
    scales its logits or drops the lm_head's last rows (Inkling's unpadded_vocab_size), which the fused path
    would leave out."""
    model = getattr(model, "module", model)  # a training wrapper (DeepSpeed's engine, DDP) holds it as .module
    text_config = model.config.get_text_config()
    for name in LOGIT_SCALES:
        if getattr(text_config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"{switch} 'fused' does not apply the model's {name}={getattr(text_config, name)!r}; "
                             "use 'ops'")
    unpadded, vocab = getattr(text_config, "unpadded_vocab_size", None), getattr(text_config, "vocab_size", None)
    if unpadded is not None and unpadded != vocab:
        raise ValueError(f"{switch} 'fused' does not drop the logits beyond the model's unpadded_vocab_size="
                         f"{unpadded!r} (its lm_head has vocab_size={vocab!r} rows); use 'ops'")
    return getattr(text_config, "final_logit_softcapping", None)
