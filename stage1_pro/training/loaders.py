"""Batch loading for training and scoring: whole batches from memory-mapped shards or tensors.

Batches are fetched as a whole (one fancy-indexing read per shard) rather than image by image,
and stay ``uint8`` NHWC until they reach the device, where :func:`stage1_pro.transforms.normalize`
turns them into float input (a quarter of the host-to-device bytes). Order is decided by
:class:`EpochBatchSampler` from ``(seed, epoch)`` alone, so a resumed run replays exactly the
batches an uninterrupted run would have seen, and each data-parallel rank takes its slice of
every global batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from stage1_pro.sizing import LOADER_PREFETCH_FACTOR


class ShardBatches(torch.utils.data.Dataset):
    """Prepared rows as batches: ``ds[list_of_rows] -> (uint8 NHWC, labels, rows)``.

    Shards are memory-mapped lazily in each process (DataLoader workers included), so the
    object pickles cheaply and no worker copies the whole dataset.
    """

    def __init__(
        self, shard_paths: Sequence[str], shard: np.ndarray, offset: np.ndarray, label: np.ndarray
    ) -> None:
        self.shard_paths = list(shard_paths)
        self.shard = np.asarray(shard)
        self.offset = np.asarray(offset)
        self.label = torch.as_tensor(np.asarray(label, dtype=np.int64))
        self._maps: list[np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    def _shards(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [np.load(p, mmap_mode="r") for p in self.shard_paths]
        return self._maps

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = np.asarray(rows, dtype=np.int64)
        maps = self._shards()
        shard, offset = self.shard[rows], self.offset[rows]
        shards = np.unique(shard)
        if shards.size == 1:  # one gather straight out of the memory map (the common case)
            out = maps[int(shards[0])][offset]
        else:
            first = maps[int(shard[0])]
            out = np.empty((rows.size, *first.shape[1:]), dtype=first.dtype)
            for s in shards:
                pos = np.flatnonzero(shard == s)
                out[pos] = maps[int(s)][offset[pos]]
        return torch.from_numpy(out), self.label[rows], torch.from_numpy(rows)


class TensorBatches(torch.utils.data.Dataset):
    """In-memory rows (images or cached features) with the same batch interface as :class:`ShardBatches`."""

    def __init__(self, inputs: torch.Tensor, label: torch.Tensor | np.ndarray) -> None:
        self.inputs = inputs
        self.label = torch.as_tensor(np.asarray(label, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        return self.inputs[idx], self.label[idx], idx


class EpochBatchSampler(Sampler[list[int]]):
    """Global batches of ``rows`` in a (seed, epoch)-determined order; this rank's slice of each.

    Args:
        rows: the dataset rows to iterate (e.g. the training split's prepared rows).
        batch_size: global batch size (all ranks together).
        shuffle: permute the rows each epoch (training) or keep their order (scoring).
        seed: base seed; the permutation of epoch ``e`` depends on ``(seed, e)`` only.
        drop_last: drop the last incomplete global batch (training: equal per-rank batches).
        rank, world_size: data-parallel position.
    """

    def __init__(
        self,
        rows: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return self.rows
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return self.rows[torch.randperm(len(self.rows), generator=gen).numpy()]

    def __len__(self) -> int:
        n = len(self.rows)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        for b in range(len(self)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.world_size > 1:
                share = -(-len(batch) // self.world_size)
                batch = batch[self.rank * share : (self.rank + 1) * share]
            if len(batch):
                yield batch.tolist()


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches with a fixed share of positives (phase 6: each half of a batch needs enough positives).

    Each class is drawn from its own stream of ``(seed, epoch)``-determined permutations, started
    again with a fresh permutation when used up, so every image of the rarer class comes up
    equally often (oversampled when rare; repeated within a batch only if the class has fewer
    images than its share of one) and a resumed epoch replays exactly. An epoch holds
    ``len(rows) // batch_size`` global batches, as many images as a plain epoch. As in
    :class:`EpochBatchSampler`, ``batch_size`` is the global batch: each data-parallel rank gets a
    balanced batch of ``batch_size // world_size`` images, in shuffled order.

    Args:
        rows: dataset rows of the training split.
        labels: their 0/1 labels (same order).
        batch_size: global batch size (a multiple of ``world_size``).
        positive_fraction: share of positives in each batch (default 0.5).
        seed, rank, world_size: as in :class:`EpochBatchSampler`.
    """

    def __init__(
        self,
        rows: Sequence[int] | np.ndarray,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        positive_fraction: float = 0.5,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        from stage1_pro.errors import DataError

        self.rows = np.asarray(rows, dtype=np.int64)
        labels = np.asarray(labels)
        if labels.shape != self.rows.shape:
            raise ValueError(f"rows {self.rows.shape} and labels {labels.shape} must have the same length")
        if not 0.0 < positive_fraction < 1.0:
            raise ValueError(f"positive_fraction={positive_fraction} must be in (0, 1)")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} does not split over {world_size} processes")
        self.local = batch_size // world_size
        self.n_pos = min(self.local - 1, max(1, round(self.local * positive_fraction)))
        self.n_neg = self.local - self.n_pos
        if self.n_pos < 1 or self.n_neg < 1:
            raise ValueError(f"a per-process batch of {self.local} cannot hold both classes")
        self.pos, self.neg = self.rows[labels == 1], self.rows[labels != 1]
        if len(self.pos) == 0 or len(self.neg) == 0:
            raise DataError(
                f"class-balanced batches need both classes in the training split; it has {len(self.pos)} "
                f"positive and {len(self.neg)} negative images"
            )
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return max(1, len(self.rows) // self.batch_size)

    @staticmethod
    def _stream(pool: np.ndarray, count: int, gen: torch.Generator) -> np.ndarray:
        rounds = -(-count // len(pool))
        return np.concatenate(
            [pool[torch.randperm(len(pool), generator=gen).numpy()] for _ in range(rounds)]
        )[:count]

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self) * self.world_size  # per-process batches of the epoch, all ranks together
        pos = self._stream(self.pos, n * self.n_pos, gen).reshape(n, self.n_pos)
        neg = self._stream(self.neg, n * self.n_neg, gen).reshape(n, self.n_neg)
        shuffles = [torch.randperm(self.local, generator=gen).numpy() for _ in range(n)]
        for b in range(self.rank, n, self.world_size):
            yield np.concatenate([pos[b], neg[b]])[shuffles[b]].tolist()


def device_batches(
    loader: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y, rows)`` with ``x``/``y`` on ``device``.

    On CUDA the next batch is copied on a side stream while the current one computes (timm's
    prefetcher idea), so the host-to-device copy of pinned memory is hidden behind the step.
    """
    if device.type != "cuda":
        for x, y, rows in loader:
            yield x.to(device), y.to(device), rows
        return
    side = torch.cuda.Stream(device)
    batches = iter(loader)

    def fetch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        try:
            x, y, rows = next(batches)
        except StopIteration:
            return None
        with torch.cuda.stream(side):
            return x.to(device, non_blocking=True), y.to(device, non_blocking=True), rows

    upcoming = fetch()
    while upcoming is not None:
        current = torch.cuda.current_stream(device)
        current.wait_stream(side)
        x, y, rows = upcoming
        x.record_stream(current)  # the caching allocator must not reuse them before the step is done
        y.record_stream(current)
        upcoming = fetch()
        yield x, y, rows


def make_loader(
    dataset: torch.utils.data.Dataset,
    sampler: EpochBatchSampler,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader that hands each sampled batch of rows to ``dataset[rows]`` in one call."""
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,  # the sampler yields whole batches
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=LOADER_PREFETCH_FACTOR if num_workers > 0 else None,
    )
