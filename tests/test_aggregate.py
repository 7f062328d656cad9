"""FedAvg weighted by n_k, NaN/Inf rejection, all-rejected round."""
import torch

from fedsoda_mpi.aggregate import fedavg


def test_fedavg_is_weighted_by_n_samples():
    a = {"w": torch.tensor([1.0, 2.0]), "v": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([3.0, 6.0]), "v": torch.tensor([[4.0]])}
    avg, rejected = fedavg([a, b], [1.0, 3.0])
    assert rejected == []
    assert torch.allclose(avg["w"], torch.tensor([2.5, 5.0])) and torch.allclose(avg["v"], torch.tensor([[3.0]]))


def test_identical_updates_average_to_themselves_bf16():
    u = {"w": torch.randn(5, 3).to(torch.bfloat16)}
    avg, _ = fedavg([u, u, u], [5, 1, 7])
    assert avg["w"].dtype == torch.bfloat16 and torch.equal(avg["w"], u["w"])


def test_non_finite_updates_are_rejected_and_all_rejected_gives_none():
    good = {"w": torch.ones(2)}
    bad = {"w": torch.tensor([float("nan"), 1.0])}
    inf = {"w": torch.tensor([float("inf"), 1.0])}
    avg, rejected = fedavg([good, bad, inf], [1, 1, 1])
    assert rejected == [1, 2] and torch.equal(avg["w"], good["w"])
    avg, rejected = fedavg([bad, inf], [1, 1])
    assert avg is None and rejected == [0, 1]
