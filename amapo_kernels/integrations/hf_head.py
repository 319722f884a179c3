"""What the fused lm_head must know of a Hugging Face causal LM's output: the final logit softcap it applies
(Gemma 2's `final_logit_softcapping`), and the logit scalings it does not. One place for the TRL integration
and amapo-train, so that neither computes log-probs of logits other than the model's."""

# Logit transforms some architectures apply after the lm_head; the fused path applies only a softcap.
LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def fused_logit_softcap(model, switch: str) -> float | None:
    """The model's final logit softcap for sequence_logps_from_hidden(logit_softcap=...), None without one.
    A ValueError naming `switch` (the caller's option that chose the fused path) for a model whose config
    scales its logits, which the fused path would leave out."""
    model = getattr(model, "module", model)  # a training wrapper (DeepSpeed's engine, DDP) holds it as .module
    text_config = model.config.get_text_config()
    for name in LOGIT_SCALES:
        if getattr(text_config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"{switch} 'fused' does not apply the model's {name}={getattr(text_config, name)!r}; "
                             "use 'ops'")
    return getattr(text_config, "final_logit_softcapping", None)
