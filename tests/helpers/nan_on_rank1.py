"""``fba`` under torchrun, with the inputs of rank 1's second step made NaN (a diverging replica)."""

import os
import sys

from fba.cli import main
from fba.engine.learner import LocalLearner

_train_step = LocalLearner.train_step


def _poisoned_on_rank1(self, inputs, targets, indices=None):
    if os.environ.get("RANK") == "1" and self.global_step == 1:
        inputs = inputs * float("nan")
    return _train_step(self, inputs, targets, indices)


LocalLearner.train_step = _poisoned_on_rank1

if __name__ == "__main__":
    sys.exit(main())
