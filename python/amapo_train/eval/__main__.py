"""`python -m amapo_train.eval`: the amapo-eval console script, as `python -m amapo_train.train` is amapo-train
(a checkout used through PYTHONPATH, without the installed scripts)."""

import sys

from amapo_train.eval.cli import main

sys.exit(main())
