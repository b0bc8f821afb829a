"""Adapter transport formats: how an adapter, or an update to it, is encoded on the wire.

`wire.format` picks one for both directions (fedinstruct/config.py, `WireSettings`):

  fp32   one packed float32 array, exactly as before (`protocol.pack`): the default
  fp16   IEEE half precision (values clamped to +-65504, so an honest update stays finite)
  bf16   bfloat16 (float32's range, 8 bits of mantissa), sent as its uint16 bit pattern
  int8   bitsandbytes' blockwise dynamic 8-bit quantization, one float32 absmax per 256 values
  nf4    bitsandbytes' 4-bit NormalFloat, two codes a byte, one float32 absmax per 64 values

The server sends the global adapter in the format (kind FULL); a client sends its update as
the DELTA from the global adapter it received, optionally sparsified to the `wire.top_k`
fraction of entries largest in magnitude (sorted int32 indices + the kept values, encoded in
the format). Whatever the format, a message is at most four arrays, never one per tensor:

  header   int32 [version, format, kind, size, kept, blocksize]
  codes    the values: float32 | float16 | uint16 (bf16 bits) | uint8 (int8 and nf4 codes)
  absmax   float32 scale per block (int8, nf4)
  indices  int32, strictly increasing positions of the kept values (top-k only)

int8 and nf4 values are zero-padded to whole blocks, so every block has its own scale and
bitsandbytes' CPU kernels take their native path. `decode` checks every field against the
size the receiver expects before any value is read, so a malformed payload is refused with a
`PayloadError` naming the field instead of reaching bitsandbytes' pointer arithmetic.

Quantization error does not accumulate: a client keeps what it failed to send (quantization
and sparsification error) and adds it to its next delta (`ErrorFeedback`, kept in the node's
Flower `context.state`); the server keeps the global adapter in float32 and rebuilds each
update as global + decoded delta, so the downlink's rounding never enters the global model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

FORMATS = ("fp32", "fp16", "bf16", "int8", "nf4")
FULL, DELTA = 0, 1  # what a message carries: a whole adapter, or an update from a reference
KINDS = {FULL: "a full adapter", DELTA: "an adapter update"}
VERSION = 1

HEADER, CODES, ABSMAX, INDICES = "header", "codes", "absmax", "indices"
HEADER_FIELDS = ("version", "format", "kind", "size", "kept", "blocksize")
BLOCKSIZE = {"int8": 256, "nf4": 64}  # values per float32 scale (nf4: QLoRA's 64)
CODE_DTYPE = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16, "int8": np.uint8,
              "nf4": np.uint8}
FP16_MAX = float(np.finfo(np.float16).max)
MAX_SIZE = (1 << 31) - 1  # int32 indices and header fields


class PayloadError(ValueError):
    """An encoded adapter does not fit what the receiver expects; the message names the
    field. `protocol` turns it into a ProtocolError."""


@dataclass(frozen=True)
class Codec:
    """A transport format, and for updates the fraction of entries sent (0: all)."""

    format: str = "fp32"
    top_k: float = 0.0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"wire format must be one of {list(FORMATS)}, got {self.format!r}")
        if not 0 <= self.top_k <= 1:
            raise ValueError(f"top_k must be in [0, 1], got {self.top_k!r}")

    @classmethod
    def of(cls, settings: Any) -> Codec:
        """The codec of a `WireSettings` (or anything with `format` and `top_k`)."""
        return cls(str(settings.format), float(settings.top_k))

    @property
    def plain(self) -> bool:
        """fp32 without sparsification: the packed float32 array of `protocol.pack`."""
        return self.format == "fp32" and not self.top_k

    @property
    def blocksize(self) -> int:
        return BLOCKSIZE.get(self.format, 0)

    def kept(self, size: int, kind: int = DELTA) -> int:
        """How many of `size` values a message of `kind` carries (top-k applies to DELTAs)."""
        if kind == FULL or not self.top_k or size == 0:
            return size
        return min(size, max(1, math.ceil(self.top_k * size)))

    def downlink(self) -> Codec:
        """What the server sends: the same format, never sparsified."""
        return Codec(self.format)

    # -- encoding -----------------------------------------------------------------------------
    def encode(self, flat: np.ndarray, kind: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(arrays, decoded): the message's arrays, and the float32 vector the receiver will
        decode from them (what error feedback subtracts)."""
        flat = np.ascontiguousarray(flat, dtype=np.float32).ravel()
        size = flat.size
        if size > MAX_SIZE:
            raise ValueError(f"{size} values are more than one message carries ({MAX_SIZE})")
        kept = self.kept(size, kind)
        arrays: dict[str, np.ndarray] = {}
        if kept < size:
            # the k largest magnitudes; ties broken by position, so encoding is deterministic
            order = np.argpartition(-np.abs(flat), kept - 1)[:kept]
            indices = np.sort(order).astype(np.int32)
            values = flat[indices]
            arrays[INDICES] = indices
        else:
            indices, values = None, flat
        codes, absmax, decoded_values = _quantize(self.format, values)
        arrays[HEADER] = np.array([VERSION, FORMATS.index(self.format), kind, size, kept,
                                   self.blocksize], dtype=np.int32)
        arrays[CODES] = codes
        if absmax is not None:
            arrays[ABSMAX] = absmax
        if indices is None:
            return arrays, decoded_values
        decoded = np.zeros(size, np.float32)
        decoded[indices] = decoded_values
        return arrays, decoded


def is_encoded(keys: Any) -> bool:
    """Whether a record's keys are those of an encoded adapter (it holds a header)."""
    return HEADER in set(keys)


def decode(arrays: Mapping[str, np.ndarray], size: int, kind: int,
           expect: Codec | None = None) -> np.ndarray:
    """The float32 vector of `size` values an encoded message carries.

    `expect`: the codec the receiver configured (the server: `wire.*`); the message must be in
    its format and carry at most its top-k share. None (a client reading the server's
    adapter): any format, no sparsification. Raises PayloadError naming the field.
    """
    header = _field(arrays, HEADER, np.int32, len(HEADER_FIELDS))
    fields = dict(zip(HEADER_FIELDS, (int(v) for v in header), strict=True))
    if fields["version"] != VERSION:
        raise PayloadError(f"header: version {fields['version']}, not {VERSION}")
    if not 0 <= fields["format"] < len(FORMATS):
        raise PayloadError(f"header: unknown format {fields['format']}")
    fmt = FORMATS[fields["format"]]
    if expect is not None and fmt != expect.format:
        raise PayloadError(f"header: format {fmt!r}, but wire.format is {expect.format!r}")
    if fields["kind"] != kind:
        raise PayloadError(f"header: kind {fields['kind']}, expected {kind} ({KINDS[kind]})")
    if fields["size"] != size:
        raise PayloadError(f"header: size {fields['size']}, but the layout holds {size} values")
    allowed = (expect or Codec(fmt)).kept(size, kind)
    kept = fields["kept"]
    if kind == FULL and kept != size:
        raise PayloadError(f"header: kept {kept}; a full adapter carries all {size} values")
    if not (0 < kept <= allowed or kept == size == 0):
        raise PayloadError(f"header: kept {kept}, must be in [1, {allowed}] (wire.top_k)")
    if fields["blocksize"] != BLOCKSIZE.get(fmt, 0):
        raise PayloadError(f"header: blocksize {fields['blocksize']}, {fmt} uses "
                           f"{BLOCKSIZE.get(fmt, 0)}")
    expected = {HEADER, CODES} | ({ABSMAX} if fmt in BLOCKSIZE else set()) | (
        {INDICES} if kept < size else set())
    if set(arrays) != expected:
        raise PayloadError(f"arrays {sorted(arrays)}; a {fmt} message with {kept} of {size} "
                           f"values holds exactly {sorted(expected)}")
    padded = _padded(fmt, kept)
    codes = _field(arrays, CODES, CODE_DTYPE[fmt], padded // 2 if fmt == "nf4" else padded)
    absmax = None
    if fmt in BLOCKSIZE:
        absmax = _field(arrays, ABSMAX, np.float32, padded // BLOCKSIZE[fmt])
        if not (np.isfinite(absmax).all() and (absmax >= 0).all()):
            raise PayloadError(f"'{ABSMAX}' must be finite and >= 0")
    values = _dequantize(fmt, codes, absmax, kept)
    if not np.isfinite(values).all():
        raise PayloadError(f"'{CODES}' decode to NaN or Inf")
    if kept == size:
        return values
    indices = _field(arrays, INDICES, np.int32, kept)
    if (kept > 1 and not (np.diff(indices) > 0).all()) or indices[0] < 0 or indices[-1] >= size:
        raise PayloadError(f"'{INDICES}' must be strictly increasing positions in [0, {size})")
    out = np.zeros(size, np.float32)
    out[indices] = values
    return out


def message_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes the arrays take as Flower Arrays (NumPy's .npy serialization, headers included)."""
    from flwr.app import Array

    return sum(len(Array(np.ascontiguousarray(a)).data) for a in arrays.values())


# -- error feedback ---------------------------------------------------------------------------
RESIDUAL_RECORD = "wire-residual"  # the node's context.state record
RESIDUAL = "residual"


class ErrorFeedback:
    """What a node did not manage to send, added to its next update (EF-SGD, Karimireddy et
    al. 2019): over rounds the sum of what was sent tracks the sum of the true updates, with
    an error bounded by one round's, instead of one that grows with every round.

    The residual lives in the node's Flower `context.state` (an ArrayRecord), so it survives
    between rounds on a deployed node and in simulation alike; a node that is never sampled
    never holds one.
    """

    def __init__(self, state: Any | None) -> None:
        self.state = state  # a RecordDict (context.state), or None: no feedback

    def corrected(self, delta: np.ndarray) -> np.ndarray:
        """`delta` plus the residual kept from the last update (none when sizes differ)."""
        residual = self._residual()
        if residual is None or residual.shape != delta.shape:
            return delta
        return delta + residual

    def keep(self, corrected: np.ndarray, sent: np.ndarray) -> None:
        if self.state is None:
            return
        from flwr.app import Array, ArrayRecord

        error = np.ascontiguousarray(corrected - sent, dtype=np.float32)
        if not np.isfinite(error).all():  # never carry a NaN into every later round
            error = np.zeros_like(error)
        self.state[RESIDUAL_RECORD] = ArrayRecord({RESIDUAL: Array(error)})

    def _residual(self) -> np.ndarray | None:
        if self.state is None or RESIDUAL_RECORD not in self.state.array_records:
            return None
        record = self.state[RESIDUAL_RECORD]
        if RESIDUAL not in record:
            return None
        return record[RESIDUAL].numpy()


# -- the formats ------------------------------------------------------------------------------
def _padded(fmt: str, count: int) -> int:
    block = BLOCKSIZE.get(fmt)
    return count if block is None else -(-count // block) * block


def _quantize(fmt: str, values: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(codes, absmax or None, decoded values) of float32 `values`."""
    if fmt == "fp32":
        return values.copy(), None, values.copy()
    if fmt == "fp16":
        codes = np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16)
        return codes, None, codes.astype(np.float32)
    if fmt == "bf16":
        half = torch.from_numpy(values).to(torch.bfloat16)
        return (half.view(torch.int16).numpy().view(np.uint16).copy(), None,
                half.float().numpy())
    import bitsandbytes.functional as bnb

    count = values.size
    padded = np.zeros(_padded(fmt, count), np.float32)
    padded[:count] = values
    block = BLOCKSIZE[fmt]
    if fmt == "int8":
        codes, state = bnb.quantize_blockwise(torch.from_numpy(padded), blocksize=block)
    else:
        codes, state = bnb.quantize_4bit(torch.from_numpy(padded), blocksize=block,
                                         quant_type="nf4")
    codes_np = codes.reshape(-1).numpy().copy()
    absmax = state.absmax.float().numpy().copy()
    return codes_np, absmax, _dequantize(fmt, codes_np, absmax, count)


def _dequantize(fmt: str, codes: np.ndarray, absmax: np.ndarray | None, count: int
                ) -> np.ndarray:
    """The first `count` float32 values of checked `codes` (and `absmax`)."""
    if fmt == "fp32":
        return codes[:count].astype(np.float32)
    if fmt == "fp16":
        return codes[:count].astype(np.float32)
    if fmt == "bf16":
        bits = torch.from_numpy(codes[:count].view(np.int16).copy())
        return bits.view(torch.bfloat16).float().numpy()
    import bitsandbytes.functional as bnb

    block = BLOCKSIZE[fmt]
    codes_t = torch.from_numpy(np.ascontiguousarray(codes))
    absmax_t = torch.from_numpy(np.ascontiguousarray(absmax))
    if fmt == "int8":
        out = bnb.dequantize_blockwise(codes_t, absmax=absmax_t, code=_dynamic_code(),
                                       blocksize=block)
    else:
        state = bnb.QuantState(absmax=absmax_t, shape=torch.Size([codes.size * 2]),
                               dtype=torch.float32, blocksize=block, quant_type="nf4")
        out = bnb.dequantize_4bit(codes_t, state)
    return out.reshape(-1)[:count].numpy().astype(np.float32, copy=False)


_CODE: list[torch.Tensor] = []


def _dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (quantize_blockwise's default, not sent)."""
    if not _CODE:
        import bitsandbytes.functional as bnb

        _CODE.append(bnb.create_dynamic_map(signed=True))
    return _CODE[0]


def _field(arrays: Mapping[str, np.ndarray], name: str, dtype: Any, size: int) -> np.ndarray:
    if name not in arrays:
        raise PayloadError(f"no '{name}' array")
    array = arrays[name]
    if not isinstance(array, np.ndarray) or array.dtype != np.dtype(dtype) or array.ndim != 1:
        got = (f"{array.ndim}-D {array.dtype}" if isinstance(array, np.ndarray)
               else type(array).__name__)
        raise PayloadError(f"'{name}' must be a 1-D {np.dtype(dtype)} array, got {got}")
    if array.size != size:
        raise PayloadError(f"'{name}' holds {array.size} values, expected {size}")
    return array
