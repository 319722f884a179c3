"""UltraFeedback generalization splits of the AMaPO paper (App. D.1, "Overfitting-underfitting Problem
Setups", following Lin et al. 2024 and Hong et al. 2025).

Prompts are split into X_train / X_valid and the response-generating models into M_train / M_valid.
For a prompt x, Y_train(x) are its responses written by models in M_train, Y_valid(x) those written
by models in M_valid. The paper's four evaluation sets:

============ =================== ===================== ==========================
set          prompts             responses             paper
============ =================== ===================== ==========================
ID           X_train (seen)      Y_train(x) (seen)     D_ID = D_train
Prompt-OOD   X_valid (unseen)    Y_train(x) (seen)     D_~Prompt
Response-OOD X_train (seen)      Y_valid(x) (unseen)   D_~Response
Mutual-OOD   X_valid (unseen)    Y_valid(x) (unseen)   D_~Mutual
============ =================== ===================== ==========================

Pair rule: "for prompts with multiple responses ... the highest-scoring one as chosen response y_w
and the lowest-scoring one as rejected response y_l".

Choices made here where the paper is vague or inconsistent (all documented, none hidden):

1. Typos in the appendix text. It prints ``Y_train(x) = U_{M_k in M_valid} Y_k(x)`` (should be
   M_train, else Y_train = Y_valid), calls M_valid "the seen response model set" for Prompt-OOD and
   M_train "the unseen response model set" for Response-OOD. The set formulas and the set names
   settle it: seen = M_train, unseen = M_valid; that is what is built.
2. ID. The paper defines D_ID with the same formula as D_train, i.e. ID accuracy is measured on the
   training pairs themselves, and states the best/worst rule only for the three OOD sets. The
   training pairs here are built with the same best/worst rule over Y_train(x), so ``train`` and
   ``id`` are the same list (both are returned / written: train on ``train``, evaluate on ``id``).
   If the policy was trained on pairs built otherwise (e.g. UltraFeedback-binarized's "best vs a
   random other"), evaluate ID on those pairs instead.
3. Ties. Among equal highest (lowest) scores, the first (last) in the record's completion order
   wins, so the result is deterministic. A prompt whose eligible responses all share one score
   has no preference and is skipped; so is a prompt with fewer than two eligible responses
   (``stats`` counts both).
4. Scores. ``score_key`` (default: ``score``, else UltraFeedback's ``overall_score``). Completions
   with a missing or non-numeric score (UltraFeedback has a few "N/A") are ignored.
5. Prompts in neither prompt set and models in neither model set are ignored (counted in ``stats``).
   The two prompt sets and the two model sets must each be disjoint (``ValueError`` otherwise).
6. The split itself. Hong et al. 2025 publish their splits (huggingface.co/collections/rm-robustness);
   they are not reproduced here. ``random_split`` (used by ``amapo-eval splits``) draws a seeded
   random split with our defaults (10% of prompts, half of the models as valid); pass the published
   lists to reproduce the paper's numbers.

Input record (UltraFeedback raw format accepted as is)::

    {"prompt" | "instruction": str, "prompt_id" | "id"?: str,
     "completions": [{"model": str, "response": str, "score" | "overall_score": float}, ...]}

Output pair::

    {"prompt_id", "prompt", "chosen", "rejected", "chosen_model", "rejected_model",
     "chosen_score", "rejected_score"}
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence

SETS = ("id", "prompt_ood", "response_ood", "mutual_ood")


def _score(completion: dict, score_key: str | None):
    keys = (score_key,) if score_key else ("score", "overall_score")
    for key in keys:
        if key in completion:
            value = completion[key]
            try:
                value = float(value)
            except (TypeError, ValueError):
                return None
            return value if math.isfinite(value) else None
    return None


def normalize_record(record: dict, score_key: str | None = None) -> dict:
    """``{"prompt_id", "prompt", "completions": [{"model", "response", "score"}]}``; completions
    without a usable score are dropped (choice 4)."""
    prompt = record.get("prompt", record.get("instruction"))
    if not isinstance(prompt, str):
        raise ValueError("record needs a string 'prompt' (or UltraFeedback's 'instruction')")
    prompt_id = record.get("prompt_id", record.get("id", prompt))
    raw = record.get("completions", [])
    # a string or an object would be iterated as characters or keys, silently giving no completion
    if not (isinstance(raw, list) and all(isinstance(comp, dict) for comp in raw)):
        raise ValueError(f"'completions' must be a list of {{model, response, score}} objects, got {raw!r:.60}")
    completions = []
    for comp in raw:
        score = _score(comp, score_key)
        if score is None or not isinstance(comp.get("response"), str) or "model" not in comp:
            continue
        completions.append({"model": str(comp["model"]), "response": comp["response"], "score": score})
    return {"prompt_id": str(prompt_id), "prompt": prompt, "completions": completions}


def best_worst(completions: Sequence[dict]):
    """``(chosen, rejected)`` = (highest, lowest) score; ties: first highest, last lowest (choice 3).
    ``None`` when fewer than two completions or all scores are equal."""
    if len(completions) < 2:
        return None
    best = worst = completions[0]
    for comp in completions[1:]:
        if comp["score"] > best["score"]:
            best = comp
        if comp["score"] <= worst["score"]:
            worst = comp
    if best["score"] == worst["score"]:
        return None
    return best, worst


def build_generalization_splits(
    records: Iterable[dict],
    *,
    train_prompts: Iterable[str],
    valid_prompts: Iterable[str],
    train_models: Iterable[str],
    valid_models: Iterable[str],
    score_key: str | None = None,
) -> dict:
    """The paper's sets from scored multi-model records (module docstring for the rules).

    Prompt sets hold prompt ids (``prompt_id``/``id``, else the prompt text). Returns
    ``{"train", "id", "prompt_ood", "response_ood", "mutual_ood": [pair, ...], "stats": {...}}``
    where ``id`` is ``train`` (choice 2) and ``stats[<set>]`` counts pairs and skipped prompts.
    """
    x_train, x_valid = set(map(str, train_prompts)), set(map(str, valid_prompts))
    m_train, m_valid = set(map(str, train_models)), set(map(str, valid_models))
    if x_train & x_valid:
        raise ValueError(f"train and valid prompts overlap: {sorted(x_train & x_valid)[:5]}")
    if m_train & m_valid:
        raise ValueError(f"train and valid models overlap: {sorted(m_train & m_valid)}")
    plan = {  # set -> (prompt set, model set)
        "train": (x_train, m_train),
        "prompt_ood": (x_valid, m_train),
        "response_ood": (x_train, m_valid),
        "mutual_ood": (x_valid, m_valid),
    }
    out = {name: [] for name in plan}
    stats = {name: {"n_pairs": 0, "n_skipped_too_few": 0, "n_skipped_tied": 0} for name in plan}
    stats["n_records"] = stats["n_prompts_unassigned"] = stats["n_completions_unassigned_model"] = 0
    for raw in records:
        rec = normalize_record(raw, score_key)
        stats["n_records"] += 1
        pid = rec["prompt_id"]
        if pid not in x_train and pid not in x_valid:
            stats["n_prompts_unassigned"] += 1
            continue
        stats["n_completions_unassigned_model"] += sum(
            c["model"] not in m_train and c["model"] not in m_valid for c in rec["completions"]
        )
        for name, (prompts, models) in plan.items():
            if pid not in prompts:
                continue
            eligible = [c for c in rec["completions"] if c["model"] in models]
            pair = best_worst(eligible)
            if pair is None:
                key = "n_skipped_too_few" if len(eligible) < 2 else "n_skipped_tied"
                stats[name][key] += 1
                continue
            chosen, rejected = pair
            out[name].append({
                "prompt_id": pid,
                "prompt": rec["prompt"],
                "chosen": chosen["response"],
                "rejected": rejected["response"],
                "chosen_model": chosen["model"],
                "rejected_model": rejected["model"],
                "chosen_score": chosen["score"],
                "rejected_score": rejected["score"],
            })
            stats[name]["n_pairs"] += 1
    out["id"] = out["train"]  # D_ID = D_train (choice 2)
    stats["id"] = stats["train"]
    out["stats"] = stats
    return out


def random_split(items: Iterable[str], valid_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Seeded split of the unique ``items`` into (train, valid): sorted, shuffled with
    ``random.Random(seed)``, the first ``round(valid_fraction * n)`` (at least 1 and at most n - 1
    when n >= 2) go to valid. Both lists are returned sorted."""
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError("valid_fraction must be in (0, 1)")
    unique = sorted(set(map(str, items)))
    if len(unique) < 2:
        raise ValueError(f"need at least two distinct items to split, got {unique}")
    k = min(max(round(valid_fraction * len(unique)), 1), len(unique) - 1)
    shuffled = unique[:]
    random.Random(seed).shuffle(shuffled)
    return sorted(shuffled[k:]), sorted(shuffled[:k])
