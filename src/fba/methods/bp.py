"""End-to-end back-propagation: one module holding every unit, the task loss only."""

from __future__ import annotations

from fba.methods import METHODS
from fba.methods.base import LocalMethod


@METHODS.register("bp")
class BackProp(LocalMethod):
    """Plain BP. The learner runs it as K=1, which is exactly end-to-end training."""

    name = "bp"
    end_to_end = True
