"""What classification offers the local-learning methods: their auxiliary networks.

DGL's auxiliary classifier is DGL's own design (:class:`~fba.methods.dgl.MLPSRClassifierAux`);
this task decides that it is the one DGL uses here, and sizes it from the model. FBA needs
nothing task-specific for classification: its task-agnostic SLM (stage-tail block, light
fusion, a copy of the classifier head) and pooled-vector bank are the classification ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from fba.methods.dgl import MLPSRClassifierAux, classifier_num_classes

if TYPE_CHECKING:
    from fba.methods.base import BuildContext


def build_dgl_aux(ctx: "BuildContext", k: int) -> nn.Module:
    """DGL's ``mlp-sr`` classifier for module k: ``(N, C_k, H, W) -> (N, num_classes)``,
    sized to the module's output channels and the model head's classes."""
    return MLPSRClassifierAux(ctx.last_spec(k).out_channels, classifier_num_classes(ctx.model, "dgl"))
