"""How FedBiOT's emulator reaches a client: sent once per node, then kept on the client's disk.

The package is the compressed model's base weights (emulator layers + adapter layers, no LoRA),
its config, the split plan and the tokenizer files: everything a client needs to build
emulator + adapter without ever holding the full model. Every FedBiOT message carries the
package's fingerprint; the weights themselves travel only to nodes that have not received them.
A client writes them as a regular model folder under ``cache_root()/"emulators"/<fingerprint>``
(or reads a prepared ``strategy.fedbiot.emulator_path``), so a restarted process loads from disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedinstruct.files import atomic_folder
from fedinstruct.methods.fedbiot.split import PLAN_FILE, SplitPlan, emulator_state_dict
from fedinstruct.model import cache_root
from fedinstruct.protocol import (
    CONFIG_RECORD,
    EMULATOR_RECORD,
    EMULATOR_TOKENIZER_RECORD,
    FEDBIOT_FINGERPRINT,
    FEDBIOT_MODEL_CONFIG,
    FEDBIOT_PLAN,
)

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "fedbiot_fingerprint.txt"
WEIGHTS_FILE = "model.safetensors"
PIN_KEY = "fedbiot-fingerprint"  # node config: the one emulator this node accepts
_FINGERPRINT = re.compile(r"[0-9a-f]{32}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a plain name: no folder, no ..
_RESERVED = {"config.json", WEIGHTS_FILE, PLAN_FILE, FINGERPRINT_FILE}


def fingerprint_of(state: Mapping[str, torch.Tensor], model_config: str, plan: SplitPlan) -> str:
    """sha256 over config, plan and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    digest.update(model_config.encode())
    digest.update(json.dumps(plan.to_dict(), sort_keys=True).encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()[:32]


def cache_folder(fingerprint: str) -> Path:
    return cache_root() / "emulators" / fingerprint


def read_fingerprint(folder: Path) -> str | None:
    path = folder / FINGERPRINT_FILE
    return path.read_text().strip() if path.is_file() else None


def _check_layers(state: Mapping[str, torch.Tensor], model_config: str) -> None:
    """Refuse weights that do not cover every decoder layer the config declares."""
    layers = int(json.loads(model_config)["num_hidden_layers"])
    present = {int(k.split(".")[2]) for k in state if k.startswith("model.layers.")}
    if present != set(range(layers)) or "model.embed_tokens.weight" not in state:
        raise ValueError(
            f"emulator weights hold decoder layers {sorted(present)}, but the config declares "
            f"{layers}; the message is not a complete FedBiOT emulator"
        )


def write_folder(
    folder: Path,
    state: Mapping[str, torch.Tensor],
    model_config: str,
    plan: SplitPlan,
    tokenizer_files: Mapping[str, bytes],
    fingerprint: str,
) -> None:
    """A folder `from_pretrained` loads (with any quantization) plus the plan and fingerprint."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(model_config)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS_FILE),
              metadata={"format": "pt"})
    for name, data in tokenizer_files.items():
        (folder / name).write_bytes(data)
    (folder / PLAN_FILE).write_text(json.dumps(plan.to_dict()))
    (folder / FINGERPRINT_FILE).write_text(fingerprint)


@dataclass
class EmulatorPackage:
    """The server's copy of what each node receives once."""

    state: dict[str, torch.Tensor]
    model_config: str
    plan: SplitPlan
    tokenizer_files: dict[str, bytes]
    fingerprint: str
    _records: dict[str, ArrayRecord] = field(default_factory=dict, repr=False)

    @classmethod
    def from_model(
        cls, compressed: PreTrainedModel, plan: SplitPlan, tokenizer: PreTrainedTokenizerBase
    ) -> EmulatorPackage:
        state = emulator_state_dict(compressed)
        config = compressed.config
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied to the embedding; from_pretrained re-ties it
        # bfloat16 has no numpy dtype, so it cannot cross the wire as a Flower Array.
        state = {k: (v.float() if v.dtype == torch.bfloat16 else v).cpu() for k, v in state.items()}
        model_config = config.to_json_string(use_diff=False)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
        return cls(state, model_config, plan, files, fingerprint_of(state, model_config, plan))

    def message_config(self) -> dict[str, str]:
        """Entries every FedBiOT message carries."""
        plan = json.dumps(self.plan.to_dict())
        return {FEDBIOT_FINGERPRINT: self.fingerprint, FEDBIOT_PLAN: plan}

    def records(self) -> dict[str, ArrayRecord]:
        """The one-time records (built once, shared by every message that carries them)."""
        if not self._records:
            tokenizer = {
                name: Array(np.frombuffer(data, dtype=np.uint8).copy())
                for name, data in self.tokenizer_files.items()
            }
            self._records = {
                EMULATOR_RECORD: ArrayRecord(self.state),
                EMULATOR_TOKENIZER_RECORD: ArrayRecord(tokenizer),
            }
        return self._records

    def save(self, folder: str | Path) -> Path:
        """Write the package as a folder clients can use as `strategy.fedbiot.emulator_path`."""
        folder = Path(folder).expanduser()
        if read_fingerprint(folder) == self.fingerprint:
            return folder
        write_folder(folder, self.state, self.model_config, self.plan, self.tokenizer_files,
                     self.fingerprint)
        return folder


def _unpack(content: RecordDict, config: ConfigRecord, fingerprint: str) -> Path:
    """Write the message's emulator into this machine's cache (once), after checking it: its
    fingerprint is computed here from the bytes received, and every file name is a plain name
    inside the cache folder, whatever the message says."""
    if FEDBIOT_MODEL_CONFIG not in config or EMULATOR_TOKENIZER_RECORD not in content:
        raise ValueError(
            f"the message carries '{EMULATOR_RECORD}' weights but no '{FEDBIOT_MODEL_CONFIG}' "
            f"config or '{EMULATOR_TOKENIZER_RECORD}' record"
        )
    state = content[EMULATOR_RECORD].to_torch_state_dict()
    model_config = str(config[FEDBIOT_MODEL_CONFIG])
    plan = SplitPlan.from_dict(json.loads(str(config[FEDBIOT_PLAN])))
    if fingerprint_of(state, model_config, plan) != fingerprint:
        raise ValueError("the emulator weights received do not match their fingerprint")
    _check_layers(state, model_config)
    files = {}
    for name, array in content[EMULATOR_TOKENIZER_RECORD].items():
        if not _FILE_NAME.fullmatch(name) or name in _RESERVED:
            raise ValueError(f"the emulator's tokenizer file name {name!r} is not a plain file "
                             "name; nothing was written")
        files[name] = array.numpy().tobytes()

    def build(folder: Path) -> None:
        write_folder(folder, state, model_config, plan, files, fingerprint)
        log.info("FedBiOT emulator received and cached in %s", cache_folder(fingerprint))

    return atomic_folder(cache_folder(fingerprint), build)  # never a partial folder


def emulator_folder(emulator_path: str | None, content: RecordDict, pin: str | None = None
                    ) -> Path:
    """The folder this client builds emulator + adapter from, for the message's fingerprint.

    Order: a configured `emulator_path`; the weights in this message (cached on the way);
    the local cache of an earlier message. Anything else is an error that says what to do.
    `pin`, from the node's own config, is the only fingerprint this node accepts.
    """
    config = content[CONFIG_RECORD]
    fingerprint = str(config.get(FEDBIOT_FINGERPRINT, ""))
    if not fingerprint:
        raise ValueError(
            f"strategy=fedbiot, but the message config has no '{FEDBIOT_FINGERPRINT}': the server "
            "does not run FedBiOT (use the same strategy on both sides)"
        )
    if not _FINGERPRINT.fullmatch(fingerprint):
        raise ValueError(f"'{FEDBIOT_FINGERPRINT}' must be 32 hex digits, got {fingerprint!r}")
    if pin and fingerprint != pin:
        raise ValueError(f"this node accepts only emulator {pin} (node config '{PIN_KEY}'), "
                         f"but the server sent {fingerprint}")
    if emulator_path:
        folder = Path(emulator_path).expanduser()
        found = read_fingerprint(folder)
        if found != fingerprint:
            raise FileNotFoundError(
                f"strategy.fedbiot.emulator_path={emulator_path!r} "
                + ("holds no FedBiOT emulator" if found is None else f"holds emulator {found}")
                + f", but the server runs emulator {fingerprint}; copy the server's emulator "
                "folder there or unset emulator_path"
            )
        return folder
    if EMULATOR_RECORD in content:
        return _unpack(content, config, fingerprint)
    folder = cache_folder(fingerprint)
    if read_fingerprint(folder) == fingerprint:
        return folder
    raise FileNotFoundError(
        f"FedBiOT emulator {fingerprint} is not cached in {folder} and this message does not carry "
        "it (the server sends it once per node per server process): restart the server, or set "
        "strategy.fedbiot.emulator_path to a copy of the emulator folder"
    )
