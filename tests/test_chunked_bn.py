"""ChunkedConvBN: a conv-BatchNorm stem run in batch chunks, exactly, with less memory."""

import copy

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

import fba
from fba.bench.memory import LiveTensorTracker
from fba.engine.checkpointing import run_checkpointed
from fba.engine.chunked_bn import ChunkedConvBN, _ChunkedConvBNFunction


def _stem(momentum=0.1, affine=True, dtype=torch.double, conv_bias=False):
    torch.manual_seed(0)
    net = resnet18().to(dtype)
    if conv_bias:
        net.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=True).to(dtype)
    net.bn1 = nn.BatchNorm2d(64, momentum=momentum, affine=affine).to(dtype)
    if affine:  # away from the (1, 0) start, so a missing scale or shift term shows
        net.bn1.weight.data.uniform_(0.5, 1.5)
        net.bn1.bias.data.normal_()
    return net


def _chunked(net, chunks, min_bytes=0):
    block = ChunkedConvBN(net.conv1, net.bn1, nn.Sequential(net.relu, net.maxpool), min_bytes)
    block.checkpoint_chunks = chunks
    return block


@pytest.mark.parametrize("chunks", [1, 3, 7, 20])
@pytest.mark.parametrize("momentum, affine, conv_bias", [(0.1, True, False), (None, True, False), (0.1, False, False),
                                                         (0.1, True, True)])
def test_outputs_gradients_and_running_statistics_equal_the_plain_stem(chunks, momentum, affine, conv_bias):
    net = _stem(momentum, affine, conv_bias=conv_bias)
    reference = copy.deepcopy(net)
    block = _chunked(net, chunks)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(7, 3, 32, 32, generator=g, dtype=torch.double, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    weight = torch.randn(7, 64, 8, 8, generator=g, dtype=torch.double)
    for _ in range(2):  # the second step checks the running-statistics update with a history
        out = block(x)
        (out * weight).sum().backward()
        out_ref = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x_ref))))
        (out_ref * weight).sum().backward()
        torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        if name.startswith(("conv1.", "bn1.")):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, b), c in zip(net.bn1.named_buffers(), reference.bn1.buffers()):
        torch.testing.assert_close(b, c, msg=name)


def test_checkpointed_recomputation_counts_the_batch_once():
    net = _stem()
    reference = copy.deepcopy(net)
    x = torch.rand(4, 3, 32, 32, dtype=torch.double)
    run_checkpointed(_chunked(net, 2), x).sum().backward()
    reference.maxpool(reference.relu(reference.bn1(reference.conv1(x)))).sum().backward()
    assert int(net.bn1.num_batches_tracked) == 1
    torch.testing.assert_close(net.bn1.running_var, reference.bn1.running_var)
    torch.testing.assert_close(net.conv1.weight.grad, reference.conv1.weight.grad)


def test_off_in_eval_without_grad_or_chunks_it_is_the_plain_stem():
    net = _stem(dtype=torch.float)
    x = torch.rand(4, 3, 32, 32)
    block = _chunked(net, 0)
    assert torch.equal(block(x), net.maxpool(net.relu(net.bn1(net.conv1(x)))))
    block.checkpoint_chunks = 2
    with torch.no_grad():
        assert torch.equal(block(x), net.maxpool(net.relu(net.bn1(net.conv1(x)))))
    block.eval(), net.eval()
    assert torch.equal(block(x), net.maxpool(net.relu(net.bn1(net.conv1(x)))))


def test_small_maps_are_not_chunked():
    net = _stem(dtype=torch.float)
    # conv1's output here: 4 x 64 x 16 x 16 floats = 256 KiB
    assert _chunked(net, 2, min_bytes=256 * 2**10)._chunked(torch.rand(4, 3, 32, 32))
    assert not _chunked(net, 2, min_bytes=256 * 2**10 + 1)._chunked(torch.rand(4, 3, 32, 32))


def test_the_backward_holds_one_chunk_of_maps():
    net = _stem(dtype=torch.float)
    x = torch.rand(8, 3, 128, 128)
    peaks = {}
    for chunks in (0, 4):
        tracker = LiveTensorTracker()  # the weights are not registered: maps and gradients only
        with tracker:
            run_checkpointed(_chunked(net, chunks), x).sum().backward()
        peaks[chunks] = tracker.peak
    # the plain backward holds more than four maps of (8, 64, 64, 64) floats at once; in
    # chunks of two samples they are a quarter of that, beside the output and its gradient
    map_bytes = 8 * 64 * 64 * 64 * 4
    assert peaks[0] >= 4 * map_bytes
    assert peaks[4] <= 0.6 * peaks[0]


def test_a_second_order_gradient_is_refused():
    net = _stem()
    x = torch.rand(4, 3, 32, 32, dtype=torch.double, requires_grad=True)
    # a squared loss, so that the output gradient itself has a graph (a gradient penalty's case)
    (grad,) = torch.autograd.grad((_chunked(net, 2)(x) ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        grad.sum().backward()


def test_a_tail_with_parameters_is_refused():
    net = _stem(dtype=torch.float)
    with pytest.raises(ValueError, match="tail must have no parameters"):
        ChunkedConvBN(net.conv1, net.bn1, nn.Conv2d(64, 64, 1))


@pytest.mark.parametrize("model", ["retinanet_resnet18", "yolov1_resnet18"])
def test_checkpointed_detection_stems_run_in_chunks_and_train_as_without(model, monkeypatch):
    # SGD: AdamW's first steps are lr * sign(g), which would turn float-order noise in a
    # near-zero gradient into a full step
    opts = dict(task="detection", model=model, method="fba", K=4, num_classes=3,
                **{"data.image_size": 64, "optim.name": "sgd"})
    chunked = fba.build_learner(**opts, checkpoint=[0])
    plain = fba.build_learner(**opts, checkpoint=False)
    plain.load_state_dict(chunked.state_dict())
    stem = chunked.local_modules[0][0].conv_bn
    assert stem.checkpoint_chunks > 0 and plain.local_modules[0][0].conv_bn.checkpoint_chunks == 0
    stem.min_bytes = 0  # the maps of this tiny input would be below the size that pays
    calls = []
    apply = _ChunkedConvBNFunction.apply
    monkeypatch.setattr(_ChunkedConvBNFunction, "apply", lambda *args: calls.append(args[2]) or apply(*args))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 64, 64, generator=g)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([i % 3])} for i in range(4)]
    for _ in range(2):
        a, b = chunked.train_step(images, targets), plain.train_step(images, targets)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    for (name, p), q in zip(chunked.plain.state_dict().items(), plain.plain.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    # two steps, each a forward and its checkpointed recomputation, in 4 chunks of one image
    assert calls == [4] * 4


def test_checkpoint_chunks_sets_the_chunks_and_zero_turns_them_off():
    opts = dict(task="detection", model="yolov1_resnet18", method="fba", K=4, num_classes=3, checkpoint=[0],
                **{"data.image_size": 64})
    assert fba.build_learner(**opts, checkpoint_chunks=8).local_modules[0][0].conv_bn.checkpoint_chunks == 8
    assert fba.build_learner(**opts, checkpoint_chunks=0).local_modules[0][0].conv_bn.checkpoint_chunks == 0
    with pytest.raises(fba.FBAError, match="checkpoint_chunks"):
        fba.build_learner(**opts, checkpoint_chunks=-1)
