"""What data-parallel learners share: gradients averaged over a torch.distributed group.

Stage trainers call a model's loss *methods* (dynamics_loss, value_loss, ...), not its forward, so
DistributedDataParallel's forward hooks would not see them; averaging after backward is the same
arithmetic and works for any method. One process (no group) leaves the gradients untouched.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def average_gradients(params) -> None:
    """Mean of every parameter's gradient over the group, in one flat all-reduce."""
    world = world_size()
    if world == 1:
        return
    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
