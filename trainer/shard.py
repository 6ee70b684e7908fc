"""This process's part of a training batch, and the gradient all-reduce when two processes
train together (trainer.parallel starts the second one; trainer.sft.train takes a Shard).

torch is imported inside the methods: the default `Shard` (one process) never needs it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

GROUP_TIMEOUT_S = 600  # gloo's wait for the other rank in one collective


@dataclass
class Shard:
    """This process's part of every batch. The default is the whole batch, alone."""

    rank: int = 0
    world: int = 1

    def rows(self, batch: list) -> list:
        return batch[self.rank::self.world]

    def start(self, params: list) -> None:
        """Make every rank's trainable weights rank 0's."""

    def reduce(self, params: list, stats: list[float]) -> list[float]:
        """Sum gradients (and the step's loss / token statistics) over the ranks."""
        return stats

    def close(self) -> None:
        pass


@dataclass
class GlooShard(Shard):
    store: str = ""
    _group: bool = field(default=False, repr=False)

    def join(self) -> "GlooShard":
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{self.store}", rank=self.rank,
                                world_size=self.world, timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        self._group = True
        return self

    def start(self, params: list) -> None:
        import torch
        import torch.distributed as dist

        flat = torch.cat([p.detach().reshape(-1) for p in params])
        dist.broadcast(flat, 0)
        offset = 0
        with torch.no_grad():
            for p in params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def reduce(self, params: list, stats: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor(stats, dtype=grads[0].dtype)])
        try:
            dist.all_reduce(flat)
        except Exception as exc:  # gloo: the other process is gone
            raise RuntimeError(f"the second training process stopped ({type(exc).__name__}: {exc}); "
                               "set training.cpu_data_parallel: off to train in one process") from None
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g)
            offset += g.numel()
        return flat[offset:].tolist()

    def close(self) -> None:
        if self._group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._group = False
