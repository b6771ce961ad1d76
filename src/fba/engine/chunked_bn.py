"""Conv -> BatchNorm -> per-sample tail, run on batch chunks with whole-batch statistics.

A ResNet stem at detection sizes writes the largest maps in the network: 64 channels at half
the input resolution. Its backward holds several of them for the whole batch at once: the
conv's output, the normalised map and their gradients. At batch 8 and 512 px that is 544 MiB,
which sets module 0's peak under local learning. Checkpointing does not help: it keeps less
during the forward, but the backward still builds the same maps.

BatchNorm couples the samples, so the batch cannot simply be cut into independent chunks.
:class:`ChunkedConvBN` cuts it anyway and stays exact:

- The forward computes the conv chunk by chunk without autograd history, gathers the
  statistics over all chunks, normalises each chunk with them, and keeps only its input.
- The backward makes two passes over the chunks. The gradient of a batch-normalised map needs
  two per-channel sums over the whole batch: sum(g) and sum(g * x_hat). These are also the
  gradients of BatchNorm's bias and scale. The first pass gathers them; the second forms each
  chunk's gradient with respect to the conv's output, and through the conv, to its weights
  and input.

So the backward passes hold one chunk's maps at a time; the forward (rerun inside the
backward when the module is checkpointed) holds the conv's output once, without history.
The price is two extra conv forwards per step, one in each pass. Under autocast (``precision``
bf16 or fp16) the stem runs whole. The outputs, gradients and running statistics equal those of ``tail(bn(conv(x)))``, up
to the order of float reductions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from fba.engine.checkpointing import BatchChunkable


#: the least size of the conv's output for which chunks are used: below it the maps are small
#: and the extra conv forwards are not worth their time (the built-in detection run at 128 px
#: writes 8 MiB; 512 px at batch 8 writes 128 MiB)
CHUNK_MIN_BYTES = 32 * 2**20


def _channel_view(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


class ChunkedConvBN(BatchChunkable):
    """``tail(bn(conv(x)))``, run in ``checkpoint_chunks`` batch chunks while training.

    Args:
        conv: a 2-d convolution.
        bn: the ``BatchNorm2d`` that follows it.
        tail: a parameter-free module that treats each sample on its own, such as ReLU and
            max-pooling.
        min_bytes: the least size of the conv's output (estimated from the input's shape and
            the conv's stride) for which chunks are used.

    Shapes are those of the plain chain: ``(N, C_in, H, W) -> tail's output``. With
    ``checkpoint_chunks = 0`` (the default), below ``min_bytes``, in eval mode, without
    gradients, under autocast, or when BatchNorm does not use batch statistics, it is exactly
    the plain chain. The modules are held by reference, so the model's parameter names do not
    change.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, tail: nn.Module, min_bytes: int = CHUNK_MIN_BYTES) -> None:
        super().__init__()
        if any(True for _ in tail.parameters()):
            raise ValueError("ChunkedConvBN's tail must have no parameters: it is recomputed chunk by chunk")
        self.conv, self.bn, self.tail = conv, bn, tail
        self.min_bytes = min_bytes

    def forward(self, x: Tensor) -> Tensor:
        if self._chunked(x):
            bn = self.bn
            return _ChunkedConvBNFunction.apply(x, self, min(self.checkpoint_chunks, x.shape[0]),
                                                self.conv.weight, self.conv.bias, bn.weight, bn.bias)
        return self.tail(self.bn(self.conv(x)))

    def _chunked(self, x: Tensor) -> bool:
        bn = self.bn
        uses_batch_statistics = bn.training or not bn.track_running_stats
        stride_h, stride_w = self.conv.stride
        out_bytes = x.numel() // x.shape[1] * self.conv.out_channels // (stride_h * stride_w) * x.element_size()
        return bool(self.checkpoint_chunks) and out_bytes >= self.min_bytes and self.training \
            and uses_batch_statistics and torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)

    # ---- the pieces of the function below -------------------------------------------------
    def statistics(self, maps: list[Tensor]) -> tuple[Tensor, Tensor, int]:
        """Per-channel mean and biased variance over the chunks of ``conv(x)``, and the count,
        from per-chunk moments combined exactly (Chan et al.), in float64."""
        counts, means, variances = [], [], []
        for z in maps:
            variance, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
            counts.append(z.numel() // z.shape[1])
            means.append(mean.double())
            variances.append(variance.double())
        total = sum(counts)
        mean = sum(n * m for n, m in zip(counts, means)) / total
        variance = sum(n * (v + (m - mean) ** 2) for n, v, m in zip(counts, variances, means)) / total
        return mean.to(maps[0].dtype), variance.to(maps[0].dtype), total

    def update_running_statistics(self, mean: Tensor, variance: Tensor, count: int) -> None:
        """What ``BatchNorm2d`` does in a training forward (``frozen_bn_statistics`` sets the
        momentum to 0 for recomputations, which leaves them unchanged here too)."""
        bn = self.bn
        if not (bn.training and bn.track_running_stats):
            return
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        unbiased = variance * (count / max(count - 1, 1))
        bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        bn.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)

    def normalised(self, z: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
        return (z - _channel_view(mean)) * _channel_view(invstd)

    def affine(self, x_hat: Tensor) -> Tensor:
        bn = self.bn
        if bn.weight is None:
            return x_hat
        return x_hat * _channel_view(bn.weight) + _channel_view(bn.bias)


class _ChunkedConvBNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, block: ChunkedConvBN, chunks: int, *params: Tensor | None) -> Tensor:
        # The whole conv output is alive here, once, without autograd history: the forward is
        # not where the stem's peak is, and it saves a conv forward over computing it twice.
        # It is made in chunks, and the statistics combined from theirs, so that each chunk's
        # map can be freed as soon as its output is made (one var_mean of the whole output would
        # keep it all until the end: 16 MiB more at the stem's peak at 512 px, batch 8).
        maps = [block.conv(part) for part in x.chunk(chunks)]
        mean, variance, count = block.statistics(maps)
        block.update_running_statistics(mean, variance, count)
        invstd = torch.rsqrt(variance + block.bn.eps)
        outs = []
        for i in range(len(maps)):
            outs.append(block.tail(block.affine(block.normalised(maps[i], mean, invstd))))
            maps[i] = None  # type: ignore[call-overload]
        out = torch.cat(outs)
        # The weights are saved too, so that autograd's version check catches an in-place update
        # between this forward and the backward, as it would for the plain chain.
        conv_weight, conv_bias, bn_weight, _ = params
        ctx.save_for_backward(x, mean, invstd, conv_weight, conv_bias, bn_weight)
        ctx.block, ctx.chunks, ctx.count = block, chunks, count
        return out

    @staticmethod
    @once_differentiable  # a second-order gradient would silently have no graph behind it
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, invstd, conv_weight, conv_bias, bn_weight = ctx.saved_tensors
        block: ChunkedConvBN = ctx.block
        conv = block.conv
        parts, grad_parts = x.chunk(ctx.chunks), grad_out.chunk(ctx.chunks)

        def tail_gradient(x_hat: Tensor, grad: Tensor) -> Tensor:
            """dL/dy for y = bn(z), through the per-sample tail."""
            with torch.enable_grad():
                y = block.affine(x_hat).detach().requires_grad_()
                # the clone lets an in-place tail (ResNet's ReLU) run on a leaf
                (g,) = torch.autograd.grad(block.tail(y.clone()), y, grad)
            return g

        # Pass 1: the two batch sums. They are also BatchNorm's bias and scale gradients.
        sum_g = torch.zeros_like(mean)
        sum_g_xhat = torch.zeros_like(mean)
        for part, grad in zip(parts, grad_parts):
            with torch.no_grad():
                x_hat = block.normalised(conv(part), mean, invstd)
            g = tail_gradient(x_hat, grad)
            sum_g += g.sum((0, 2, 3))
            sum_g_xhat += (g * x_hat).sum((0, 2, 3))

        # Pass 2: dL/dz = gamma * invstd * (g - mean(g) - x_hat * mean(g * x_hat)), then the conv's.
        scale = invstd if bn_weight is None else bn_weight * invstd
        mean_g, mean_g_xhat = sum_g / ctx.count, sum_g_xhat / ctx.count
        wants_input, wants_weight, wants_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        # Detached aliases of the conv's parameters: a gradient hook on the parameters themselves
        # would otherwise fire once per chunk.
        weight = conv_weight.detach().requires_grad_(wants_weight)
        bias = None if conv_bias is None else conv_bias.detach().requires_grad_(wants_bias)
        conv_inputs = [p for p, wanted in ((weight, wants_weight), (bias, wants_bias)) if wanted]
        grad_weight = torch.zeros_like(weight) if wants_weight else None
        grad_bias = torch.zeros_like(bias) if wants_bias else None
        grad_x = []
        for part, grad in zip(parts, grad_parts):
            with torch.enable_grad():
                part = part.detach().requires_grad_(wants_input)
                z = functional_call(conv, {"weight": weight, "bias": bias}, (part,))
                x_hat = block.normalised(z.detach(), mean, invstd)
                g = tail_gradient(x_hat, grad)
                grad_z = _channel_view(scale) * (g - _channel_view(mean_g) - x_hat * _channel_view(mean_g_xhat))
                del g, x_hat
                inputs = conv_inputs + ([part] if wants_input else [])
                grads = torch.autograd.grad(z, inputs, grad_z) if inputs else ()
            grads = list(grads)
            if wants_weight:
                grad_weight += grads.pop(0)
            if wants_bias:
                grad_bias += grads.pop(0)
            if wants_input:
                grad_x.append(grads.pop(0))
        has_affine = bn_weight is not None
        return (torch.cat(grad_x) if wants_input else None, None, None, grad_weight, grad_bias,
                sum_g_xhat if has_affine and ctx.needs_input_grad[5] else None,
                sum_g if has_affine and ctx.needs_input_grad[6] else None)
