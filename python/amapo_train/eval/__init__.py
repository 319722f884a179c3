"""Evaluation tools (issue 7): ranking accuracy (AMaPO Eq. 4), RM-Bench, the UltraFeedback
generalization splits, and batched generation for AlpacaEval 2 / MT-Bench (``generation.py``; ``amapo-eval``,
``cli.py``).
Records, texts, tokenization and batches are the training driver's (``amapo_train.data``).

    from amapo_train.data import PreferenceDataset
    from amapo_train.eval import make_batches, evaluate_ranking
    pairs = PreferenceDataset(records, tokenizer)  # any record format of amapo_train.data.FORMATS
    result = evaluate_ranking(model, make_batches(pairs, 8, tokenizer.pad_token_id))
"""

from amapo_train.data import PreferenceDataset
from amapo_train.eval.ranking import (
    BATCH_KEYS,
    NonFiniteScores,
    collate,
    evaluate_ranking,
    make_batches,
    pair_logps,
    ranking_accuracy,
)
from amapo_train.eval.rmbench import load_rmbench, rmbench_accuracy, rmbench_report, score_rmbench
from amapo_train.eval.splits import build_generalization_splits, random_split

__all__ = [
    "BATCH_KEYS",
    "NonFiniteScores",
    "PreferenceDataset",
    "build_generalization_splits",
    "collate",
    "evaluate_ranking",
    "load_rmbench",
    "make_batches",
    "pair_logps",
    "random_split",
    "ranking_accuracy",
    "rmbench_accuracy",
    "rmbench_report",
    "score_rmbench",
]
