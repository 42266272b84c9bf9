"""Which evaluation batches this process runs, and the gather that puts every process's results back in order.

Batches are fixed slices of the data (batch i = items[i*bs:(i+1)*bs]), the same as on one process, and are dealt
round-robin to the processes; results are gathered and reassembled in batch order, so every metric is computed
from exactly the numbers a single process would have produced. Where each forward is a collective (ZeRO-3 / FSDP2
weights left sharded), every process runs the same number of forwards (the short ones repeat a batch whose result
is dropped) and generation steps in lockstep.
"""

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    collective: bool = True  # each forward is a collective (sharded weights): every process runs as many

    def batch_slices(self, n_items: int, batch_size: int) -> list[slice | None]:
        """This process's batches in order; None marks a padding forward (on batch 0's data, result dropped)."""
        n_batches = -(-n_items // batch_size)
        per_process = -(-n_batches // self.world) if self.lockstep else 0
        mine = [i for i in range(self.rank, n_batches, self.world)]
        return [slice(i * batch_size, min(n_items, (i + 1) * batch_size)) for i in mine] + \
            [None] * (per_process - len(mine))

    def gather(self, results: list) -> list:
        """All processes' per-batch results (this process's, in batch_slices order, padding dropped), in batch order."""
        if self.world == 1:
            return results
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, results)
        ordered = []
        for turn in range(max(map(len, everyone))):  # batch turn*world + rank sits at everyone[rank][turn]
            ordered += [part[turn] for part in everyone if turn < len(part)]
        return ordered

    @property
    def lockstep(self) -> bool:
        """Several processes whose forwards are collectives: the same number of forwards everywhere, and generation
        keeps stepping until every process is done (synced_gpus)."""
        return self.world > 1 and self.collective


def current_shard() -> Shard:
    """One shard per process of the running process group; the whole data set without one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()
