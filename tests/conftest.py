import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_batch(n: int = 8, channels: int = 3, size: int = 16, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def assert_perturbing_aux_changes_only_its_module(build, batch, j: int = 1, scale: float = 1.0) -> None:
    """Gradient isolation: two learners from ``build()`` that differ only in aux net j.

    After one step on ``batch = (inputs, targets, indices)`` exactly module j's parameters
    differ; every other module, every other aux net and the head are bit-identical.
    """
    a, b = build(), build()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for p in b.aux_nets[j].parameters():
            p.add_(scale * torch.randn_like(p))
    a.train_step(*batch)
    b.train_step(*batch)
    for k in range(a.K):
        same = all(torch.equal(p, q) for p, q in zip(a.local_modules[k].parameters(), b.local_modules[k].parameters()))
        assert same == (k != j), f"module {k}: perturbing aux {j} {'changed' if not same else 'did not change'} it"
    for k in range(a.K - 1):
        if k != j:
            assert all(torch.equal(p, q) for p, q in zip(a.aux_nets[k].parameters(), b.aux_nets[k].parameters()))
    assert all(torch.equal(p, q) for p, q in zip(a.head.parameters(), b.head.parameters()))
