"""Which rows a client trains on and which rows the server evaluates on, from the run config.

Clients and the server call the same functions with the same config, so a partition is the
same everywhere without any data crossing the wire.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from datasets import Dataset

from fedinstruct.config import DatasetSettings, RunConfig
from fedinstruct.data import (
    FieldMap,
    holdout_per_category,
    load_instruction_dataset,
    load_prepartitioned,
    load_prepartitioned_test,
    make_synthetic_dataset,
    partition_dataset,
)


def _fields(settings: DatasetSettings) -> FieldMap:
    f = settings.fields
    return FieldMap(
        instruction=f.instruction, context=f.context, response=f.response, category=f.category
    )


def _train_and_test(
    settings: DatasetSettings, num_partitions: int, seed: int
) -> tuple[Dataset, Dataset]:
    """The whole training pool and the held-out test set (cached per process).

    Built once per process however many partitions it serves; each client's share is then
    selected on demand (`partition_dataset`), so a process that serves 10 of 1,000 virtual
    clients builds 10 partitions, not 1,000. Only the last few pools are kept: a long-lived
    process that serves run after run does not keep every run's data.
    """
    key = (repr(settings), num_partitions, seed)
    if key not in _POOLS:
        _POOLS[key] = _load_train_and_test(settings, num_partitions, seed)
        while len(_POOLS) > _POOLS_KEPT:
            _POOLS.popitem(last=False)
    _POOLS.move_to_end(key)
    return _POOLS[key]


_POOLS: OrderedDict[tuple[str, int, int], tuple[Dataset, Dataset]] = OrderedDict()
_POOLS_KEPT = 2


def _load_train_and_test(
    settings: DatasetSettings, num_partitions: int, seed: int
) -> tuple[Dataset, Dataset]:
    if settings.name == "synthetic":
        pool = make_synthetic_dataset(settings.samples_per_client * num_partitions, seed=seed)
        return pool, _synthetic_test(settings, seed)
    data = load_instruction_dataset(settings.source, fmt=settings.format, fields=_fields(settings))
    if settings.test_source:
        test = load_instruction_dataset(
            settings.test_source, fmt=settings.format, fields=_fields(settings)
        )
        return data, test
    if settings.label_column and settings.holdout_per_category > 0:
        return holdout_per_category(
            data,
            per_category=settings.holdout_per_category,
            seed=seed,
            label_column=settings.label_column,
        )
    split = data.train_test_split(test_size=settings.test_fraction, seed=seed)
    return split["train"], split["test"]


def _synthetic_test(settings: DatasetSettings, seed: int) -> Dataset:
    """The synthetic held-out rows: drawn on their own, independent of the training pool."""
    return make_synthetic_dataset(settings.test_samples, seed=seed + 10_000)


def client_dataset(cfg: RunConfig, partition_id: int, num_partitions: int) -> Dataset:
    """This client's local training rows."""
    settings = cfg.dataset
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id={partition_id} is out of range for {num_partitions} partitions"
        )
    if settings.partitioner == "prepartitioned":
        return load_prepartitioned(settings.source, partition_id)
    pool, _ = _train_and_test(settings, num_partitions, cfg.seed)
    return partition_dataset(
        pool,
        num_partitions=num_partitions,
        partition_id=partition_id,
        scheme=settings.partitioner,
        label_column=settings.label_column or "category",
        alpha=settings.alpha,
        shards_per_partition=settings.shards_per_partition,
        seed=cfg.seed,
    )


def local_file_dataset(cfg: RunConfig, data_path: str) -> Dataset:
    """A real node's own file or folder (`--node-config data-path=...`)."""
    if not Path(data_path).expanduser().exists():
        raise FileNotFoundError(f"node config data-path={data_path!r} does not exist")
    return load_instruction_dataset(
        str(Path(data_path).expanduser()), fmt=cfg.dataset.format, fields=_fields(cfg.dataset)
    )


def test_dataset(cfg: RunConfig) -> Dataset:
    """The server's held-out evaluation rows (first `eval.max_samples` of them)."""
    settings = cfg.dataset
    if settings.partitioner == "prepartitioned":
        test = load_prepartitioned_test(settings.source)
    elif settings.name == "synthetic":  # the server needs no pool of num_clients shares
        test = _synthetic_test(settings, cfg.seed)
    else:
        _, test = _train_and_test(settings, cfg.federation.num_clients, cfg.seed)
    if cfg.eval.max_samples and len(test) > cfg.eval.max_samples:
        test = test.shuffle(seed=cfg.seed).select(range(cfg.eval.max_samples))
    return test
