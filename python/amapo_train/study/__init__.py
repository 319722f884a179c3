"""A miniature AMaPO study: with the same tuning budget, does the adaptive margin raise ranking accuracy,
in and out of distribution, and at which statistics pool size?

    python -m amapo_train.study                      # the default: 5 seeds, CPU (23.5 min measured on 2 cores)
    python -m amapo_train.study --quick              # a smoke-sized run (the test suite's)
    python -m amapo_train.study --device cuda --scale 4

A tiny Llama is fitted to responses of the train-time models (SFT), then trained from that shared start with
DPO, SimPO, AMaPO (variant "code" and "paper") and AMaPO's four ablations (task.py: the synthetic task and
its splits). Every method gets the same budget: a 4-setting grid (design.py), each setting run on every seed;
the setting with the best validation accuracy (fresh pairs of ID prompts; mean over seeds) is the method's
tuned setting, reported on the ID / Prompt-OOD / Response-OOD / Mutual-OOD test splits with a bootstrap
interval over seeds and pairs, and AMaPO - SimPO as a paired difference per split (statistics.py). AMaPO at
its tuned setting is rerun with its batch statistics over pools of 4, 8, 16, 32 pairs, the effective batch
fixed by gradient accumulation (the paper's Table 11 in miniature). The gradient-allocation view: per step,
the share of the paper's d_theta = |dL/d chosen logp| + |dL/d rejected logp| on wrongly ranked pairs.
On the CPU, runs go to one single-threaded worker process per core (each run is a pure function of its
seed and setting, so the numbers do not depend on the worker count). Writes results.md, results.json and
plots to --out-dir (benchmarks/study)."""

from amapo_train.study.design import GRIDS, METHODS, StudyConfig
from amapo_train.study.run import main
from amapo_train.study.task import SPLITS, Task

__all__ = ["GRIDS", "METHODS", "SPLITS", "StudyConfig", "Task", "main"]
