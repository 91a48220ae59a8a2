"""Data-parallel training averages gradients: two ranks, each on half of a batch, end with the
gradient one process gets on the whole batch, for PhysCode (DistributedDataParallel, as Ray Train's
`prepare_model` wraps it) and for the world model (`learners.distributed.average_gradients`, which the
world-model and alignment loops call after their backward). Real torch.distributed (gloo) in two
processes; no Ray. The GRPO learner group's 1-vs-2 check is in tests/test_learner_group.py."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.unit  # two local processes, no Ray cluster, no browser

PHYSCODE = dict(f_dim=12, u_dim=8, e_dim=6, d=16, gate_hidden=8, layers=2, heads=2, clip_len=4, codes=10)


def _physcode_grads(batch_slice=slice(None), wrap=None) -> dict[str, torch.Tensor]:
    from ipr_dist.models.physcode import PhysCode, PhysCodeConfig

    torch.manual_seed(0)
    model = PhysCode(PhysCodeConfig(**PHYSCODE)).eval()  # eval: no EMA codebook step inside the forward
    g = torch.Generator().manual_seed(1)
    f, u, e = (torch.randn(8, 4, n, generator=g) for n in (12, 8, 6))
    fn = torch.randn(8, 12, generator=g)
    flow = torch.arange(8) % 2 == 0
    net = wrap(model) if wrap else model
    out = net(f[batch_slice], u[batch_slice], e[batch_slice], fn[batch_slice], flow_on=flow[batch_slice])
    out["loss"].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _world_model_grads(batch_slice=slice(None), average=False) -> dict[str, torch.Tensor]:
    from ipr_dist.models.world_model import WorldModel, WorldModelConfig
    from learners.distributed import average_gradients

    torch.manual_seed(0)
    model = WorldModel(WorldModelConfig(f_dim=6, code_dim=4, d=16, layers=2, heads=2, horizon=4), torch.randn(7, 4))
    torch.nn.init.normal_(model.dyn_head[-1].weight, std=0.1)
    g = torch.Generator().manual_seed(2)
    f, codes = torch.randn(8, 5, 6, generator=g), torch.randint(0, 7, (8, 4), generator=g)
    model.dynamics_loss(f[batch_slice], codes[batch_slice])["loss"].backward()
    if average:
        average_gradients(model.parameters())
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        half = slice(rank * 4, rank * 4 + 4)
        ddp = _physcode_grads(half, wrap=lambda m: torch.nn.parallel.DistributedDataParallel(m))
        wm = _world_model_grads(half, average=True)
        results[rank] = {"physcode": ddp, "world_model": wm}
    finally:
        dist.destroy_process_group()


def test_two_ranks_on_half_batches_get_the_whole_batch_gradient():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(port, results), nprocs=2, join=True)
        ranks = [dict(results[r]) for r in range(2)]
    whole = {"physcode": _physcode_grads(), "world_model": _world_model_grads()}
    for model, full in whole.items():
        one_half = _physcode_grads(slice(0, 4)) if model == "physcode" else _world_model_grads(slice(0, 4))
        assert any(not torch.allclose(one_half[n], full[n], atol=1e-5) for n in full)  # the halves differ
        for rank in ranks:
            assert rank[model].keys() >= full.keys()
            # average_gradients also averages parameters this loss does not reach (zeros, as None would be)
            assert all(not rank[model][n].any() for n in rank[model].keys() - full.keys())
            for name, grad in full.items():
                assert torch.allclose(rank[model][name], grad, atol=1e-5), (model, name)
