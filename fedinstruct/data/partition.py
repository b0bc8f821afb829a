"""Split one instruction dataset among clients (IID, Dirichlet, or FedIT's category shards).

Partitioning goes through flwr-datasets partitioners so the splits match what the Flower
ecosystem calls by the same names. Every scheme is deterministic for a given seed, so each
client process can rebuild its own partition independently and all of them agree.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "pathological")

# A process that serves several simulated clients asks for partitions of the same dataset
# again and again; the assignment is computed once per (dataset, settings) and reused.
_PARTITIONER_CACHE: OrderedDict[tuple, Partitioner] = OrderedDict()
_CACHE_SIZE = 4


class CategoryShardPartitioner(Partitioner):
    """FedIT's pathological non-IID split: sort by label, cut into equal contiguous shards,
    deal `shards_per_partition` random shards to each partition.

    flwr-datasets' ShardPartitioner drops the rows left over when the dataset does not divide
    evenly into shards; this keeps every row (shard sizes differ by at most one), as FedIT does.
    """

    def __init__(self, num_partitions: int, partition_by: str, shards_per_partition: int = 2,
                 seed: int = 42) -> None:
        super().__init__()
        if num_partitions < 1 or shards_per_partition < 1:
            raise ValueError("num_partitions and shards_per_partition must be >= 1, got "
                             f"{num_partitions} and {shards_per_partition}")
        self._num_partitions = num_partitions
        self._partition_by = partition_by
        self._shards_per_partition = shards_per_partition
        self._seed = seed
        self._deal: tuple[np.ndarray, list[np.ndarray], np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def _assign(self) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """(label order, shards as views into it, the dealt shard permutation): computed once,
        O(rows); a partition's row list is built only when that partition is loaded."""
        if self._deal is None:
            labels = np.asarray(self.dataset[self._partition_by][:])  # [:] reads the column at once
            order = np.argsort(labels, kind="stable")  # ties keep dataset order
            num_shards = self._num_partitions * self._shards_per_partition
            if len(order) < num_shards:
                raise ValueError(f"dataset has {len(order)} rows, fewer than the {num_shards} "
                                 "shards needed (num_partitions * shards_per_partition)")
            shards = np.array_split(order, num_shards)
            dealt = np.random.default_rng(self._seed).permutation(num_shards)
            self._deal = (order, shards, dealt)
        return self._deal

    def partition_indices(self, partition_id: int) -> list[int]:
        """The sorted dataset rows of one partition."""
        _, shards, dealt = self._assign()
        per = self._shards_per_partition
        mine = dealt[partition_id * per:(partition_id + 1) * per]
        return sorted(int(i) for s in mine for i in shards[s])

    def load_partition(self, partition_id: int) -> Dataset:
        if not 0 <= partition_id < self._num_partitions:
            raise ValueError(f"partition_id={partition_id} is out of range for "
                             f"num_partitions={self._num_partitions}")
        return self.dataset.select(self.partition_indices(partition_id))


def _make_partitioner(ds: Dataset, scheme: str, num_partitions: int, label_column: str,
                      alpha: float, shards_per_partition: int, seed: int,
                      min_partition_size: int) -> tuple[Partitioner, Dataset]:
    if scheme == "iid":
        # IidPartitioner cuts contiguous blocks; shuffling first with our seed makes them IID.
        return IidPartitioner(num_partitions=num_partitions), ds.shuffle(seed=seed)
    if label_column not in ds.column_names:
        raise ValueError(f"label_column={label_column!r} is not a column of the dataset "
                         f"(columns: {', '.join(ds.column_names)}); scheme {scheme!r} needs it")
    if scheme == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        partitioner: Partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by=label_column, alpha=float(alpha),
            min_partition_size=min_partition_size, self_balancing=False, shuffle=True,
            seed=seed)
        return partitioner, ds
    return CategoryShardPartitioner(num_partitions, label_column, shards_per_partition,
                                    seed), ds


def partition_dataset(ds: Dataset, *, num_partitions: int, partition_id: int,
                      scheme: str = "iid", label_column: str = "category", alpha: float = 0.5,
                      shards_per_partition: int = 2, seed: int = 42,
                      min_partition_size: int = 1) -> Dataset:
    """Return client `partition_id`'s share of `ds` under `scheme`.

    "iid": seeded shuffle then equal blocks. "dirichlet": per-label proportions drawn from
    Dir(alpha), resampled until each client holds >= `min_partition_size` rows.
    "pathological": FedIT's category-sorted shards, `shards_per_partition` per client.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is unknown; choose one of {', '.join(SCHEMES)}")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id={partition_id} is out of range for "
                         f"num_partitions={num_partitions} (ids 0..{num_partitions - 1})")
    if num_partitions > len(ds):
        raise ValueError(f"num_partitions={num_partitions} exceeds the {len(ds)} rows")
    key = (ds._fingerprint, scheme, num_partitions, label_column, alpha, shards_per_partition,
           seed, min_partition_size)
    partitioner = _PARTITIONER_CACHE.get(key)
    if partitioner is None:
        partitioner, source = _make_partitioner(ds, scheme, num_partitions, label_column, alpha,
                                                shards_per_partition, seed, min_partition_size)
        partitioner.dataset = source
        _PARTITIONER_CACHE[key] = partitioner
        while len(_PARTITIONER_CACHE) > _CACHE_SIZE:
            _PARTITIONER_CACHE.popitem(last=False)
    _PARTITIONER_CACHE.move_to_end(key)
    return partitioner.load_partition(partition_id)


def holdout_per_category(ds: Dataset, *, per_category: int, seed: int = 42,
                         label_column: str = "category") -> tuple[Dataset, Dataset]:
    """Split off FedIT's held-out test set: `per_category` random rows of every category.

    Returns (train, test); train keeps the dataset order, test is grouped by category.
    """
    if label_column not in ds.column_names:
        raise ValueError(f"label_column={label_column!r} is not a column of the dataset "
                         f"(columns: {', '.join(ds.column_names)})")
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    labels = np.asarray(ds[label_column][:])
    rng = np.random.default_rng(seed)
    test_rows: list[int] = []
    for category in sorted(set(labels.tolist())):
        rows = np.flatnonzero(labels == category)
        if len(rows) < per_category:
            raise ValueError(f"category {category!r} has {len(rows)} rows, fewer than "
                             f"per_category={per_category}")
        test_rows.extend(int(i) for i in rng.choice(rows, size=per_category, replace=False))
    held_out = set(test_rows)
    train_rows = [i for i in range(len(ds)) if i not in held_out]
    return ds.select(train_rows), ds.select(test_rows)
