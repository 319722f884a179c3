"""RM-Bench scoring (Liu et al. 2024, "RM-Bench: Benchmarking Reward Models of Language Models with
Subtlety and Style", arXiv:2410.16184; ICLR 2025).

Each RM-Bench record has one prompt, three chosen and three rejected responses, in the style order
``[concise, detailed_plain, detailed_markdown]`` (y^0, y^L, y^{L,M}: the style gets "fancier" with
the index). For each prompt the 3x3 matrix ``M[i][j] = score(chosen_i) > score(rejected_j)`` (rows:
chosen, columns: rejected; strict ``>``, a tie is wrong) is averaged over prompts, then

- **Hard**   = mean of the strict upper-right triangle (``i < j``, ``np.triu(M, 1)``): the chosen
  response has a *less* fancy style than the rejected one, so a style bias works against the model;
- **Normal** = mean of the diagonal (``i == j``): same style;
- **Easy**   = mean of the strict lower-left triangle (``i > j``, ``np.tril(M, -1)``): the chosen
  response is the more fancy one;
- **Average** = (Easy + Normal + Hard) / 3, which equals the mean of all nine cells (each part
  has three); the "Avg." of the AMaPO paper's Table 3.

Source of the index convention: ``compute_accuracy`` in THU-KEG/RM-Bench, ``scripts/utils.py``, as
reproduced in that repository's README.md, section "how to compute the accuracy" ("hard accuracy:
the average of the upper-right triangle of the matrix, namely chosen responses with less fancy style
compared to rejected responses with more fancy style"; easy: lower-left triangle). The official code
sums the indicator over prompts first and then takes the triangle means; both are linear, so
per-prompt averaging (here) gives the same numbers.

Score. As the official ``scripts/run_dpo.py`` does for a DPO policy without reference model
(``--ref_free_type avg``, its default), a response's score is the policy's length-normalized
log-prob of the response given the prompt (``pair_logps``' ``*_mean``).

Headline (``rmbench_report``), as RM-Bench's scorer reports it for ``total_dataset.json``: its
``compute_accuracy`` first splits the records into the four domains ``chat``, ``math``, ``code``,
``safety`` by prefix (``domain.startswith(name)``, so the released subsets ``safety-refuse`` and
``safety-response`` are pooled into one ``safety`` set, prompt by prompt), runs the 3x3 scorer on each,
and reports Hard / Normal / Easy as the plain mean over the four domains and the total average as the
mean of the domain averages (``split_dataset_by_domain`` and the ``'domain' in results[0]`` branch of
``compute_accuracy`` in ``scripts/utils.py`` of RM-Bench; read in the copy shipped with
xiusic/Rubric-RM, ``evaluation/RM-Bench/scripts/utils.py``). Every domain weighs the same whatever its
number of prompts. A record in none of the four domains is left out of the headline, as there; the
numbers over all prompts together (``pooled``) are kept as a secondary line. A tie counts as wrong
(strict ``>``), as there. Where a domain has no prompt, RM-Bench's code would divide by zero; here the
headline is the mean over the domains present and ``complete`` is False.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from amapo_train.data import PreferenceDataset, read_json_records
from amapo_train.eval.ranking import evaluate_ranking, make_batches

STYLES = ("concise", "detailed_plain", "detailed_markdown")
DOMAINS = ("chat", "math", "code", "safety")  # RM-Bench's headline domains, in its order
LEVELS = ("easy", "normal", "hard", "average")


def rmbench_accuracy(chosen_scores, rejected_scores) -> dict:
    """Easy / Normal / Hard / Average accuracy from ``[N, 3]`` score arrays (style order as ``STYLES``).

    Returns ``{"easy", "normal", "hard", "average", "n", "matrix"}`` (``matrix``: the 3x3 mean of
    ``chosen[:, i] > rejected[:, j]`` over prompts, rows chosen, as nested lists).
    """
    c = torch.as_tensor(chosen_scores, dtype=torch.float64)
    r = torch.as_tensor(rejected_scores, dtype=torch.float64)
    if c.ndim != 2 or c.shape[1] != 3 or r.shape != c.shape:
        raise ValueError(f"chosen_scores and rejected_scores must both be [N, 3]; got {tuple(c.shape)}, {tuple(r.shape)}")
    if c.shape[0] == 0:
        raise ValueError("rmbench_accuracy needs at least one prompt")
    if torch.isnan(c).any() or torch.isnan(r).any():
        raise ValueError("scores contain NaN")
    matrix = (c[:, :, None] > r[:, None, :]).to(torch.float64).mean(0)  # [3, 3]: rows chosen, cols rejected
    upper = torch.triu(torch.ones(3, 3, dtype=torch.bool), 1)
    hard = matrix[upper].mean().item()  # i < j: chosen less fancy than rejected
    easy = matrix[upper.T].mean().item()  # i > j: chosen more fancy than rejected
    normal = matrix.diagonal().mean().item()
    return {
        "easy": easy,
        "normal": normal,
        "hard": hard,
        "average": (easy + normal + hard) / 3.0,
        "n": int(c.shape[0]),
        "matrix": matrix.tolist(),
    }


def headline_domain(domain: str) -> str | None:
    """The RM-Bench headline domain a record's ``domain`` counts in (``safety-refuse`` -> ``safety``),
    by prefix as RM-Bench's ``split_dataset_by_domain``; None for a domain outside the four."""
    return next((name for name in DOMAINS if domain.startswith(name)), None)


def rmbench_report(chosen_scores, rejected_scores, domains: Sequence[str]) -> dict:
    """RM-Bench's numbers from ``[N, 3]`` score arrays and each prompt's released ``domain``.

    Returns ``{"headline", "domains", "subsets", "pooled", "n_outside_domains"}``:

    - ``headline``: ``easy`` / ``normal`` / ``hard`` / ``average`` as RM-Bench reports them (mean over
      the four domains of each domain's number; see the module docstring), plus ``domains`` (those
      averaged) and ``complete`` (all four present); None when no prompt is in any of the four;
    - ``domains``: ``rmbench_accuracy`` of each of ``chat``, ``math``, ``code``, ``safety`` present;
    - ``subsets``: ``rmbench_accuracy`` of each released ``domain`` value (``safety-refuse``, ...);
    - ``pooled``: ``rmbench_accuracy`` of all prompts together (the secondary line).
    """
    c = torch.as_tensor(chosen_scores, dtype=torch.float64)
    r = torch.as_tensor(rejected_scores, dtype=torch.float64)
    domains = [str(d) for d in domains]
    if c.ndim != 2 or len(domains) != c.shape[0]:
        raise ValueError(f"domains must have one entry per prompt; got {len(domains)} for {c.shape[0]} prompts")

    def rows_where(keep) -> dict:
        rows = torch.tensor([keep(d) for d in domains], dtype=torch.bool)
        return rmbench_accuracy(c[rows], r[rows])

    per_domain = {name: rows_where(lambda d, name=name: headline_domain(d) == name)
                  for name in DOMAINS if any(headline_domain(d) == name for d in domains)}
    subsets = {name: rows_where(lambda d, name=name: d == name) for name in sorted(set(domains))}
    headline = None
    if per_domain:
        headline = {level: sum(acc[level] for acc in per_domain.values()) / len(per_domain) for level in LEVELS}
        headline.update(domains=list(per_domain), complete=len(per_domain) == len(DOMAINS))
    return {
        "headline": headline,
        "domains": per_domain,
        "subsets": subsets,
        "pooled": rmbench_accuracy(c, r),
        "n_outside_domains": sum(headline_domain(d) is None for d in domains),
    }


def _check_record(i: int, rec: dict) -> dict:
    if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
        raise ValueError(f"RM-Bench record {i}: needs a string 'prompt'")
    for side in ("chosen", "rejected"):
        value = rec.get(side)
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value)):
            raise ValueError(f"RM-Bench record {i}: '{side}' must be a list of 3 strings ({', '.join(STYLES)})")
    out = {"prompt": rec["prompt"], "chosen": list(rec["chosen"]), "rejected": list(rec["rejected"]),
           "domain": str(rec.get("domain", "unknown"))}
    if "id" in rec:
        out["id"] = rec["id"]
    return out


def check_rmbench_records(raw: Sequence[dict]) -> list[dict]:
    """RM-Bench records (``total_dataset.json``'s layout: ``{"id"?, "prompt": str, "chosen": [3 str],
    "rejected": [3 str], "domain"?: str}``), checked; a record without ``domain`` gets ``"unknown"``."""
    return [_check_record(i, rec) for i, rec in enumerate(raw)]


def load_rmbench(path) -> list[dict]:
    """``check_rmbench_records`` of a JSON list (the released ``total_dataset.json``) or JSONL file,
    optionally gzipped (read by ``amapo_train.data.read_json_records``)."""
    return check_rmbench_records(read_json_records(path))


def score_rmbench(
    model,
    tokenizer,
    records: Sequence[dict],
    *,
    batch_size: int = 4,
    max_length: int = 2048,
    max_prompt_length: int = 1800,
    format_pair: Callable[[str, str, str], tuple[str, str, str]] | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Length-normalized log-prob scores of every response: ``(chosen [N, 3], rejected [N, 3], kept [N])``.

    The three (chosen_k, rejected_k) pairs of each prompt go through ``PreferenceDataset`` /
    ``pair_logps``; ``format_pair(prompt, chosen, rejected) -> (prompt, chosen, rejected)`` renders
    the texts first (the CLI: the chat template, ``amapo_train.data.chat_texts``); without it the raw texts are
    used. A prompt with an empty response is not scorable: its row is NaN and ``kept`` is False.
    """
    pairs = []
    for rec in records:
        for k in range(3):
            texts = (rec["prompt"], rec["chosen"][k], rec["rejected"][k])
            # a blank response stays blank, for PreferenceDataset to drop: a chat template would render it as
            # its end-of-turn text, scored as if it were an answer
            if format_pair is not None and texts[1].strip() and texts[2].strip():
                texts = format_pair(*texts)
            pairs.append(dict(zip(("prompt", "chosen", "rejected"), texts)))
    tokenized = PreferenceDataset(pairs, tokenizer, fmt="pairs", max_length=max_length,
                                  max_prompt_length=max_prompt_length)
    n = len(records)
    chosen = torch.full((n, 3), math.nan, dtype=torch.float64)
    rejected = torch.full((n, 3), math.nan, dtype=torch.float64)
    if tokenized:
        batches = make_batches(tokenized, batch_size, getattr(tokenizer, "pad_token_id", None))
        res = evaluate_ranking(model, batches, progress=progress, n_boot=1, return_logps=True)
        lp = res["logps"]
        for idx, c, r in zip(lp["index"], lp["chosen_mean"], lp["rejected_mean"]):
            chosen[idx // 3, idx % 3] = c
            rejected[idx // 3, idx % 3] = r
    kept = ~(torch.isnan(chosen).any(1) | torch.isnan(rejected).any(1))
    return chosen, rejected, kept
