"""Helper of tests/test_dataset.py: attribute_dataset under torchrun (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node=2 --standalone \
        tests/data/dataset_torchrun.py OUT_PLANNED OUT_STREAMED OUT_FAILING

Writes the same small CNN's attributions twice: from a map-style DataLoader (each rank loads only
its batches) and from a plain list of batches (each rank iterates all and skips the others'),
then checks that an error on rank 1 alone makes both ranks raise instead of waiting forever.
``make_model_and_data`` is imported by the test for the single-process reference run.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset


def make_model_and_data() -> tuple[nn.Module, TensorDataset]:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    x = torch.randn(22, 3, 8, 8, generator=gen)
    y = torch.randint(0, 5, (22,), generator=gen)
    return model.eval(), TensorDataset(x, y)


def main(planned_dir: str, streamed_dir: str, failing_dir: str) -> None:
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from dynamiclrp.dataset import attribute_dataset

    dist.init_process_group("gloo")
    try:
        model, data = make_model_and_data()
        loader = DataLoader(data, batch_size=4)
        kwargs = dict(target="label", shard_size=1, progress=False)
        a = attribute_dataset(model, loader, planned_dir, **kwargs)
        b = attribute_dataset(model, list(loader), streamed_dir, **kwargs)
        assert a.world_size == b.world_size == dist.get_world_size(), (a, b)
        assert a.shards_computed == b.shards_computed == 6, (a, b)
        check_failure_on_one_rank(model, loader, failing_dir, dist.get_rank())
    finally:
        dist.destroy_process_group()


def check_failure_on_one_rank(model, loader, out_dir: str, rank: int) -> None:
    from dynamiclrp.dataset import attribute_dataset
    from dynamiclrp.errors import DynamicLRPError

    def fail_on_rank_1(batch, output):
        if rank == 1:
            raise RuntimeError("simulated failure on rank 1")
        return output.argmax(1)

    try:
        attribute_dataset(
            model, loader, out_dir, target=fail_on_rank_1, shard_size=1, progress=False
        )
    except Exception as e:  # rank 1: its own error; rank 0: the gathered report of it
        expected = DynamicLRPError if rank == 0 else RuntimeError
        assert type(e) is expected, (rank, type(e), e)
        assert "simulated failure on rank 1" in str(e), (rank, e)
    else:
        raise AssertionError(f"rank {rank}: no error although rank 1 failed")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
