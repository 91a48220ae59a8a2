"""New policy weights from learner rank 0 to the policy servers by a collective broadcast.

Each server shares a two-process torch.distributed group with learner rank 0 (rank 0 the learner,
rank 1 the server), made from its own TCPStore, outside the learners' default group, so a server
that dies and is restarted by Ray rejoins alone without touching the learners' group. NCCL between
two GPUs, with the weights on the wire in bfloat16; gloo through host memory (float32) when either
side is on the CPU or both share one GPU. Both sides know the tensors: the
server's model is the same architecture, so it lists the floating-point entries of its own state
dict by name; the learner sends those entries in that order, packed into flat buckets of at most
`BUCKET_BYTES` (one collective per bucket, not one per tensor), and the server copies each bucket
back into its parameters. The version travels with the driver's call to both sides.

vLLM engines do not use this: they join vLLM's own weight-transfer engine (serving/vllm_backend.py).
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist

BUCKET_BYTES = 256 << 20


def free_address() -> tuple[str, int]:
    """This node's IP and a free TCP port, for a group's store."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


class PairGroup:
    """A two-process group: rank 0 (learner, hosts the store) and rank 1 (a policy server). NCCL when
    both sides hold different GPUs; gloo through host memory when either is on the CPU or both share
    one GPU (NCCL refuses two ranks on one device, e.g. fractional GPUs on a single-GPU machine)."""

    def __init__(self, host: str, port: int, rank: int, device: str, timeout_s: float):
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, 2, rank == 0, timeout=timeout)
        device = torch.device(device)
        store.set(f"gpu{rank}", _gpu_uuid(device))
        mine, theirs = _gpu_uuid(device), store.get(f"gpu{1 - rank}").decode()
        if mine and theirs and mine != theirs:
            self.device = device
            self.pg = dist.ProcessGroupNCCL(store, rank, 2)
        else:
            self.device = torch.device("cpu")
            self.pg = dist.ProcessGroupGloo(store, rank, 2, timeout)
        self.backend = self.pg.name()

    def broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([tensor], opts).wait()


def _gpu_uuid(device: torch.device) -> str:
    """The GPU's UUID ("" on the CPU): two processes compare them to tell whether they share a GPU."""
    if device.type != "cuda":
        return ""
    return str(torch.cuda.get_device_properties(device).uuid)


def wire_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 between GPUs (half the bytes; the servers compute in it), float32 on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def layout_of(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Size]]:
    """The entries a push carries, in order: every floating-point tensor of the state dict, by name."""
    return [(name, t.shape) for name, t in sorted(state.items()) if t.is_floating_point()]


def buckets(layout: list[tuple[str, torch.Size]], element_bytes: int) -> list[list[tuple[str, torch.Size]]]:
    out: list[list[tuple[str, torch.Size]]] = [[]]
    size = 0
    for name, shape in layout:
        n = shape.numel() * element_bytes
        if out[-1] and size + n > BUCKET_BYTES:
            out.append([])
            size = 0
        out[-1].append((name, shape))
        size += n
    return [b for b in out if b]


def send(groups: dict[str, PairGroup], state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Broadcast `state` (the learner's full state dict) to the server of every group at once: each
    bucket is packed once per wire format and its collectives to all servers are in flight together.
    Returns {key: why} for the groups whose server did not take it (the group is then unusable)."""
    failed: dict[str, str] = {}
    by_wire: dict[tuple, list[str]] = {}
    for key, group in groups.items():
        by_wire.setdefault((group.device, wire_dtype(group.device)), []).append(key)
    for (device, dtype), keys in by_wire.items():
        for bucket in buckets(layout_of(state), torch.empty((), dtype=dtype).element_size()):
            flat = torch.cat([state[name].detach().reshape(-1).to(device, dtype) for name, _ in bucket])
            works = {}
            for key in keys:
                if key in failed:
                    continue
                opts = dist.BroadcastOptions()
                opts.rootRank = 0
                try:
                    works[key] = groups[key].pg.broadcast([flat], opts)
                except Exception as exc:
                    failed[key] = f"{type(exc).__name__}: {exc}"
            for key, work in works.items():
                try:
                    work.wait()
                except Exception as exc:  # the server died mid-push
                    failed[key] = f"{type(exc).__name__}: {exc}"
    return failed


@torch.no_grad()
def receive(group: PairGroup, model: torch.nn.Module) -> int:
    """Receive a push into `model`'s own tensors (same names and shapes as the learner's); returns bytes."""
    dtype = wire_dtype(group.device)
    state = model.state_dict()
    received = 0
    for bucket in buckets(layout_of(state), torch.empty((), dtype=dtype).element_size()):
        flat = torch.empty(sum(shape.numel() for _, shape in bucket), dtype=dtype, device=group.device)
        group.broadcast(flat)
        offset = 0
        for name, shape in bucket:
            n = shape.numel()
            state[name].copy_(flat[offset:offset + n].view(shape))  # to the model's device and dtype
            offset += n
        received += flat.numel() * flat.element_size()
    return received
