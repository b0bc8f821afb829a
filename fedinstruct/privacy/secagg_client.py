"""The client side of secure aggregation: Flower's SecAgg+ (`secaggplus_mod`) around FedIT's
own training.

A secure run's server drives Flower's `SecAggPlusWorkflow` (`fedinstruct.privacy.secagg_server`):
four `train` messages per round (setup, share keys, collect masked vectors, unmask), each
carrying Flower's `secaggplus_configs` record. `secaggplus_mod` answers the key stages itself;
in the collect stage it calls `_fit` below, which

1. reads the round's global adapter (one packed float32 array, as every fedinstruct message
   carries it) and the train config from the legacy FitIns records,
2. trains through the ClientApp's own train handler (the same code path as a plain run),
3. turns the trained adapter into the update `trained - global` (small: it fits SecAgg+'s
   clipping range with room to spare),
4. with `privacy.dp=client` clips the update's L2 norm to the clip the server's DP wrapper put
   in the config (Flower's `clip_inputs_inplace`): under SecAgg nobody can screen or clip an
   update after it leaves the client, so this clip is what bounds one client's influence,
5. returns it with its weight: the samples trained on, capped at the round's cap
   (`WEIGHT_CAP`), or 1 for every client when the cap is 0 (DP, or no cap known).

`secaggplus_mod` then multiplies the update by weight / max_weight, quantizes it, appends the
weight as one more masked value and masks the whole vector; the server only ever unmasks the
sum of the weighted updates and the sum of the weights. The reply's array records are emptied
by the mod; what travels in the clear is the weight and the per-client numbers of a plain
reply (loss, token counts, times).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, clip_inputs_inplace

from fedinstruct.protocol import (
    ADAPTER_RECORD,
    CONFIG_RECORD,
    METRICS_RECORD,
    PACKED,
    WEIGHT,
    ProtocolError,
)

# config keys of a secure run's train messages (server -> client)
WEIGHT_CAP = "secagg-weight-cap"  # the most samples a weight may count; 0: every client weighs 1
FITINS_PARAMETERS = "fitins.parameters"  # Flower's legacy FitIns records, as the workflow sends
FITINS_CONFIG = "fitins.config"

Train = Callable[[Message, Context], Message]


def is_secagg(msg: Message) -> bool:
    """Whether `msg` is one of the SecAgg+ stages of a secure run's round."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def serve(msg: Message, context: Context, train: Train) -> Message:
    """Answer a SecAgg+ stage; `train` is the ClientApp's train handler (called once a round,
    in the collect stage). The protocol's state lives in `context.state` between stages."""
    return secaggplus_mod(msg, context, lambda m, c: _fit(m, c, train))


def client_update(trained: np.ndarray, global_flat: np.ndarray, clip: float | None
                  ) -> np.ndarray:
    """`trained - global`, its L2 norm clipped to `clip` (None: not clipped)."""
    update = trained.astype(np.float32) - global_flat.astype(np.float32)
    if clip is not None:
        clip_inputs_inplace([update], clip)
    return update


def client_weight(samples: float, cap: int) -> int:
    """A reply's weight in the sum: the samples trained on, at most `cap`; 1 when cap is 0."""
    return 1 if cap <= 0 else int(min(max(samples, 0), cap))


def _fit(msg: Message, context: Context, train: Train) -> Message:
    content = msg.content
    if FITINS_PARAMETERS not in content.array_records or FITINS_CONFIG not in (
            content.config_records):
        raise ProtocolError("a SecAgg+ collect stage needs the FitIns records "
                            f"'{FITINS_PARAMETERS}' and '{FITINS_CONFIG}'")
    tensors = list(content[FITINS_PARAMETERS].values())
    if len(tensors) != 1:
        raise ProtocolError(f"a secure round's adapter is one packed array, got {len(tensors)}")
    global_flat = bytes_to_ndarray(tensors[0].data)
    if global_flat.dtype != np.float32 or global_flat.ndim != 1:
        raise ProtocolError(f"the packed adapter is {global_flat.ndim}-D {global_flat.dtype}")
    config = ConfigRecord(dict(content[FITINS_CONFIG]))

    msg.content = RecordDict({ADAPTER_RECORD: ArrayRecord({PACKED: Array(global_flat)}),
                              CONFIG_RECORD: config})
    try:
        reply = train(msg, context)  # the plain path's handler: select rows, train, pack
    finally:
        msg.content = content
    trained = reply.content[ADAPTER_RECORD][PACKED].numpy()
    metrics = dict(reply.content[METRICS_RECORD])
    clip = config.get(KEY_CLIPPING_NORM)
    update = client_update(trained, global_flat, None if clip is None else float(clip))
    weight = client_weight(float(metrics[WEIGHT]), int(config.get(WEIGHT_CAP, 0)))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([update]), weight, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
