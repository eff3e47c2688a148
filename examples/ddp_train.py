"""A tiny DistributedDataParallel training run: a linear model on random data, CPU, gloo.

It reads only the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), so it
runs unchanged under `rankd launch` and under `torchrun`; see README.md here.
Every rank prints its loss per step; rank 0 ends with one summary line.
"""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel

STEPS = 10
BATCH = 32
FEATURES = 8


@record  # on failure, torch writes the traceback where rankd reads it
def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    model = DistributedDataParallel(torch.nn.Linear(FEATURES, 1))  # weights from rank 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(rank)  # each rank its own shard
    target_weights = torch.linspace(-1.0, 1.0, FEATURES)

    for step in range(STEPS):
        x = torch.randn(BATCH, FEATURES, generator=data)
        y = x @ target_weights + 0.5
        loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
        optimizer.zero_grad()
        loss.backward()  # DDP averages the gradients over all ranks here
        optimizer.step()
        print(f"rank {rank} step {step} loss {loss.item():.4f}", flush=True)

    # Every replica must hold the same weights after the synchronised steps.
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    highest, lowest = params.clone(), params.clone()
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    if rank == 0:
        in_sync = torch.equal(highest, lowest)
        print(
            f"done: {STEPS} steps on {world} ranks, mean final loss {mean_loss.item():.4f}, "
            f"replicas in sync: {in_sync}",
            flush=True,
        )
    # DDP's reducer lives in reference cycles and holds gloo work objects; free it
    # while the interpreter is fully alive. Left to the collector at interpreter
    # exit, a gloo worker thread can abort the process ("terminate called without
    # an active exception", seen with torch 2.13).
    del model, optimizer
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
