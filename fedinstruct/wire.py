"""Adapters on the wire: one flat array per message instead of one array per tensor.

Flower stores and moves every Array of an ArrayRecord as an object of its own: in deployment
each is an HTTPS request and a few SQL transactions on the SuperLink, and again between a
SuperNode and its ClientApp. A LoRA adapter has a hundred tensors or more (SmolLM2: 120), so
per-object costs, not bytes, dominated a deployment's round. Packed, the adapter is one float32
array, its tensors in sorted-name order; the receiver unpacks it against names and shapes it
already knows (its own model's adapter, or the reference the server sent), so no names travel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

PACKED = "packed"  # the one array of a packed record

Layout = Mapping[str, tuple[int, ...]]


def layout_of(state: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def pack(state: ArrayRecord | Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """One float32 array: every tensor flattened, in sorted-name order."""
    if isinstance(state, ArrayRecord) and list(state.keys()) == [PACKED]:
        return state  # packed already (messages of one round may share their records)
    if isinstance(state, ArrayRecord):
        tensors = {name: array.numpy() for name, array in state.items()}
    else:
        tensors = {name: np.asarray(t.detach().cpu() if isinstance(t, torch.Tensor) else t)
                   for name, t in state.items()}
    flat = [tensors[name].astype(np.float32, copy=False).ravel() for name in sorted(tensors)]
    return ArrayRecord({PACKED: Array(np.concatenate(flat) if flat else np.zeros(0, np.float32))})


def unpack(record: ArrayRecord, layout: Layout) -> ArrayRecord:
    """The named tensors of a packed record (a record that is not packed is returned as is).

    Raises ValueError, naming both counts, when the array does not fit the layout.
    """
    if list(record.keys()) != [PACKED]:
        return record
    flat = record[PACKED].numpy()
    sizes = [math.prod(layout[name]) for name in sorted(layout)]
    if flat.ndim != 1 or flat.size != sum(sizes):
        raise ValueError(f"the packed adapter holds {flat.size} values of shape {flat.shape}; "
                         f"{len(layout)} tensors need {sum(sizes)}")
    arrays, start = {}, 0
    for name, size in zip(sorted(layout), sizes, strict=True):
        arrays[name] = Array(np.ascontiguousarray(flat[start:start + size]).reshape(layout[name]))
        start += size
    return ArrayRecord(arrays)


def pack_message(msg: Message, key: str = "arrays") -> Message:
    """Pack the message's adapter record in place (other records, e.g. centroids, as they are)."""
    if key in msg.content.array_records:
        msg.content[key] = pack(msg.content[key])
    return msg
