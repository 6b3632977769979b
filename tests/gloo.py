"""Two-process gloo groups for the DDP tests, joined the way torchrun's workers join them."""

from __future__ import annotations

import contextlib
import os
import socket

import torch

from sparse_circuits.clt.train import distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int):
    """Rank `rank` of a CPU process group on `port`, through `clt.train.distributed` (which
    waits for every rank before it closes the group)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    with distributed(torch.device("cpu")):
        yield
