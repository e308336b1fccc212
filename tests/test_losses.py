"""InfoNCE: hand-computed values, GradCache equivalence (loss and gradients), and the 2-process gathered loss."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from embedrl.losses import cached_info_nce, info_nce


def test_info_nce_matches_hand_computation() -> None:
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    t = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=-1)
    tau = 0.5
    s = [[0.8, 0.0], [0.96, 0.8]]  # q @ t.T
    q2t = (
        -(
            math.log(math.exp(s[0][0] / tau) / sum(math.exp(v / tau) for v in s[0]))
            + math.log(math.exp(s[1][1] / tau) / sum(math.exp(v / tau) for v in s[1]))
        )
        / 2
    )
    cols = [[s[0][0], s[1][0]], [s[0][1], s[1][1]]]  # t @ q.T
    t2q = (
        -(
            math.log(math.exp(cols[0][0] / tau) / sum(math.exp(v / tau) for v in cols[0]))
            + math.log(math.exp(cols[1][1] / tau) / sum(math.exp(v / tau) for v in cols[1]))
        )
        / 2
    )
    out = info_nce(q, t, temperature=tau)
    assert out["loss_q2t"].item() == pytest.approx(q2t, rel=1e-5)
    assert out["loss_t2q"].item() == pytest.approx(t2q, rel=1e-5)
    assert out["loss"].item() == pytest.approx((q2t + t2q) / 2, rel=1e-5)
    # q1 ranks t0 (0.96) above its own t1 (0.8): q->t accuracy 1/2; t->q: t0 prefers q1 (0.96) too -> 1/2.
    assert out["accuracy"].item() == pytest.approx(0.5)


def test_info_nce_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[n, D\]"):
        info_nce(torch.zeros(3, 4), torch.zeros(2, 4))


class _Encoder(torch.nn.Module):
    """A small encoder with dropout, so GradCache must replay the RNG to match."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.Dropout(0.3), torch.nn.Tanh(), torch.nn.Linear(16, 8)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_cached_info_nce_equals_plain_loss_and_gradients(chunk: int) -> None:
    torch.manual_seed(0)
    model = _Encoder()
    xq, xt = torch.randn(8, 6), torch.randn(8, 6)

    # Plain: one forward per side, with the RNG state that GradCache will also start from.
    torch.manual_seed(123)
    plain = info_nce(
        torch.cat([model(c) for c in xq.split(chunk)]),
        torch.cat([model(c) for c in xt.split(chunk)]),
        temperature=0.05,
    )
    plain["loss"].backward()
    plain_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    torch.manual_seed(123)
    cached = cached_info_nce(model, xq.split(chunk), xt.split(chunk), temperature=0.05)
    assert cached["loss"].item() == pytest.approx(plain["loss"].item(), abs=1e-6)
    assert cached["accuracy"].item() == pytest.approx(plain["accuracy"].item())
    for g_plain, p in zip(plain_grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g_plain, rtol=1e-5, atol=1e-6)


def test_cached_info_nce_without_rng_replay_would_differ() -> None:
    """Guards the test above: with dropout, two un-replayed passes give different embeddings."""
    torch.manual_seed(0)
    model = _Encoder()
    x = torch.randn(4, 6)
    assert not torch.allclose(model(x), model(x))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, q: torch.Tensor, t: torch.Tensor, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = q.shape[0] // world
        q_local = q[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        t_local = t[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        out = info_nce(q_local, t_local, temperature=0.1)
        out["loss"].backward()
        results[rank] = (out["loss"].item(), q_local.grad.clone(), t_local.grad.clone())
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gathered_loss_equals_single_process() -> None:
    torch.manual_seed(0)
    q = F.normalize(torch.randn(8, 5), dim=-1)
    t = F.normalize(torch.randn(8, 5), dim=-1)
    qs, ts = q.clone().requires_grad_(True), t.clone().requires_grad_(True)
    single = info_nce(qs, ts, temperature=0.1)
    single["loss"].backward()

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), q, t, results), nprocs=2, join=True)
    mean_loss = (results[0][0] + results[1][0]) / 2
    assert mean_loss == pytest.approx(single["loss"].item(), rel=1e-5)
    # DDP averages gradients over ranks: the per-rank gradients of the local rows, divided by the world size,
    # are the single-process gradients of the global mean loss.
    q_grad = torch.cat([results[0][1], results[1][1]]) / 2
    t_grad = torch.cat([results[0][2], results[1][2]]) / 2
    torch.testing.assert_close(q_grad, qs.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(t_grad, ts.grad, rtol=1e-4, atol=1e-6)
