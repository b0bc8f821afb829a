"""FedBiOT end to end on a tiny LLaMA: what crosses the wire, and a whole simulated federation."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

from fedinstruct.client_app import handle_select, handle_train
from fedinstruct.compose import compose_config
from fedinstruct.config import ConfigError
from fedinstruct.methods.base import server_method
from fedinstruct.methods.fedbiot.client import FedBiOTClient
from fedinstruct.methods.fedbiot.package import (
    cache_folder,
    emulator_folder,
)
from fedinstruct.methods.fedbiot.server import public_dataset
from fedinstruct.methods.fedbiot.split import split_lora_state
from fedinstruct.model import load_base_model
from fedinstruct.protocol import (
    EMULATOR_RECORD,
    FEDBIOT_FINGERPRINT,
    PACKED,
    SELECT,
    SELECTED_CLUSTERS,
    Instruction,
    layout_of,
    read_instruction,
    unpack,
)
from fedinstruct.server.loop import FederatedRun
from fedinstruct.server.output import RunOutput
from fedinstruct.simulation import simulate

LAYER = re.compile(r"layers\.(\d+)\.")
# 6 layers, K=2, beta=0.5: emulator keeps full layers 0 and 3, adapter = layers 4 and 5.
SETTINGS = [
    "model=tiny",
    "model.tiny.num_hidden_layers=6",
    "strategy=fedbiot",
    "strategy.fedbiot.pre_align_steps=4",
    "strategy.fedbiot.align_steps=2",
    "strategy.fedbiot.align_lr=2e-3",
    "strategy.fedbiot.public_samples=16",
    "dataset.samples_per_client=24",
    "train.local_steps=3",
    "eval.max_samples=4",
    "eval.max_new_tokens=8",
    "federation.num_clients=3",
    "federation.client_cpus=1",
    "num_rounds=2",
]


def layers_of(keys) -> set[int]:
    return {int(LAYER.search(k).group(1)) for k in keys}


class InProcessGrid:
    """A Grid that hands each pushed message straight to the real ClientApp handlers (one
    Context per node) and keeps every message both ways for inspection."""

    def __init__(self, cfg, num_nodes: int) -> None:
        self.cfg = cfg
        self.contexts = {
            100 + i: Context(
                run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
                node_config={"partition-id": i, "num-partitions": num_nodes},
            )
            for i in range(num_nodes)
        }
        self.log: list[tuple[Message, Message]] = []
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            msg_id = f"m{len(self.log)}"
            msg.metadata.__dict__["_message_id"] = msg_id  # what Flower's InMemoryGrid does
            handler = handle_select if msg.metadata.message_type == SELECT else handle_train
            reply = handler(self.cfg, msg, self.contexts[msg.metadata.dst_node_id])
            self.log.append((msg, reply))
            self.replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


@pytest.mark.slow
def test_round_loop_with_fedhds_sends_lora_down_emulator_once_and_adapter_lora_up(
    tmp_path, flower_identity
):
    cfg = compose_config(
        [*SETTINGS, f"output_dir={tmp_path}", "selection=fedhds", "selection.fedhds.reducer=pca",
         "selection.fedhds.keep_noise=true", "num_rounds=1", "eval.every=0",
         "strategy.fedbiot.pre_align_steps=2"]
    )
    server = server_method(cfg)
    grid = InProcessGrid(cfg, num_nodes=3)
    FederatedRun(cfg, grid, server, RunOutput(tmp_path)).run()
    plan = server.plan
    assert plan.num_compressed_layers == 4 < plan.num_layers == 6

    # FedHDS's selection exchange, then training; the emulator rides on the first message only
    kinds = [m.metadata.message_type for m, _ in grid.log]
    assert kinds == [SELECT] * 3 + ["train"] * 3
    first = {}
    for msg, _ in grid.log:
        first.setdefault(msg.metadata.dst_node_id, msg)
    assert len({id(m.content) for m, _ in grid.log}) == len(grid.log)  # one RecordDict each
    loaded, fresh = FedBiOTClient(cfg).model(read_instruction(grid.log[-1][0]), {})
    layout = layout_of(get_peft_model_state_dict(loaded.model))  # what a client unpacks against
    lora_keys = set(unpack(grid.log[0][0].content["arrays"], layout).keys())
    emulator_lora, adapter_lora = split_lora_state(dict.fromkeys(lora_keys), plan)
    assert all("lora_" in k for k in lora_keys)
    assert layers_of(emulator_lora) == {0, 1} and layers_of(adapter_lora) == {2, 3}

    for msg, reply in grid.log:
        records = set(msg.content.array_records)
        if msg is first[msg.metadata.dst_node_id]:  # the emulator goes down once per node
            assert records == {"arrays", EMULATOR_RECORD, "emulator-tokenizer"}
            weights = msg.content[EMULATOR_RECORD]
            assert not any("lora_" in k for k in weights)
            assert layers_of(k for k in weights if "layers." in k) == {0, 1, 2, 3}
        else:
            assert records == {"arrays"}
        assert list(msg.content["arrays"].keys()) == [PACKED]  # one array on the wire
        assert set(unpack(msg.content["arrays"], layout).keys()) == lora_keys
        if msg.metadata.message_type == "train":
            assert SELECTED_CLUSTERS in msg.content["config"]  # FedHDS's ids ride along
            assert set(reply.content.array_records) == {"arrays"}
            up = unpack(reply.content["arrays"], {k: layout[k] for k in adapter_lora})
            assert set(up.keys()) == set(adapter_lora)
        assert not reply.content.config_records
        for metrics in reply.content.metric_records.values():
            assert all(isinstance(v, int | float) for v in metrics.values())

    assert not fresh  # built once per process, then reused
    assert len(loaded.model.base_model.model.model.layers) == 4  # never the full model
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and layers_of(trainable) == {2, 3}  # adapter LoRA only
    # the emulator LoRA the clients trained with is the server's, untouched by local training
    sent = unpack(grid.log[-1][0].content["arrays"], layout)
    client_emulator, _ = split_lora_state(get_peft_model_state_dict(loaded.model), plan)
    assert all(torch.equal(client_emulator[k], torch.from_numpy(sent[k].numpy())) for k in sent
               if k in emulator_lora)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1]
    assert rows[0]["local_clusters"] > 0 and rows[0]["train_samples"] > 0
    assert rows[0]["align_loss_after"] <= rows[0]["align_loss_before"]
    assert cache_folder(str(first[100].content["config"][FEDBIOT_FINGERPRINT])).is_dir()


@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fedbiot-run")
    cfg = compose_config([*SETTINGS, f"output_dir={folder}"])
    simulate(cfg)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return cfg, folder, rows


@pytest.mark.slow
def test_simulated_run_reports_both_evaluations_and_alignment(simulated_run):
    _, _, rows = simulated_run
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        for key in ("eval_loss", "eval_rougeL", "emu_eval_loss", "emu_eval_rougeL"):
            assert math.isfinite(row[key]), (row["round"], key)
    for row in rows[1:]:
        assert row["nodes_replied"] == 3 and row["train_samples"] > 0
        assert row["align_loss_after"] <= row["align_loss_before"]
        assert row["time_align"] > 0
    assert "pre_align_loss_after" in rows[1] and "pre_align_loss_after" not in rows[2]
    # emulator weights go down in round 1 only; the adapter (2 of 4 LoRA layers) goes up
    assert rows[1]["bytes_down"] > 10 * rows[2]["bytes_down"]
    # down: emulator + adapter LoRA, up: adapter LoRA only (same size here), one header each
    assert rows[2]["bytes_down"] / rows[2]["bytes_up"] == pytest.approx(2, rel=1e-2)


@pytest.mark.slow
def test_exported_adapter_loads_on_the_full_model(simulated_run):
    cfg, folder, _ = simulated_run
    adapter = folder / "adapters" / "final"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert layers_of(saved) == {4, 5}
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # trained
    base, _ = load_base_model(cfg.model, quantize=False)
    model = PeftModel.from_pretrained(base, str(adapter))
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    lora_layers = {int(LAYER.search(n).group(1)) for n, _ in model.named_modules() if "lora_A" in n}
    assert lora_layers == {4, 5}


def test_fedbiot_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="server_optimizer"):
        compose_config(["strategy=fedbiot", "strategy.server_optimizer=fedadam"])
    split = tmp_path / "dolly-split"  # a client's file must never serve as public data
    split.mkdir()
    row = {"instruction": "Name a color.", "context": "", "response": "Blue", "category": "open_qa"}
    (split / "local_training_0.json").write_text(json.dumps([row]))
    cfg = compose_config(
        ["strategy=fedbiot", "dataset=dolly", f"dataset.source={split}",
         f"strategy.fedbiot.public_dataset={split / 'local_training_0.json'}"]
    )
    with pytest.raises(ConfigError, match="public_dataset"):
        public_dataset(cfg)


def test_a_client_without_the_emulator_says_what_to_do(tmp_path, flower_identity, monkeypatch):
    monkeypatch.setenv("FEDINSTRUCT_CACHE", str(tmp_path))
    cfg = compose_config([*SETTINGS, f"output_dir={tmp_path}"])
    config = ConfigRecord({"server-round": 1, FEDBIOT_FINGERPRINT: "0123abcd" * 4})
    instruction = Instruction(1, ArrayRecord(), config, RecordDict({"config": config}))
    with pytest.raises(FileNotFoundError, match="emulator_path"):
        FedBiOTClient(cfg).model(instruction, {})


def test_a_prepared_emulator_path_replaces_the_one_time_download(tmp_path, flower_identity):
    folder = tmp_path / "emulator"
    cfg = compose_config([*SETTINGS, f"output_dir={tmp_path}",
                          f"strategy.fedbiot.emulator_path={folder}"])
    server = server_method(cfg)
    arrays = server.initial_arrays()  # the server writes its emulator to the empty path
    messages = server.address(
        server.strategy.configure_train(1, arrays, ConfigRecord(), InProcessGrid(cfg, 3)))
    assert all(set(m.content.array_records) == {"arrays"} for m in messages)
    assert emulator_folder(str(folder), messages[0].content) == folder
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    (folder / "fedbiot_fingerprint.txt").write_text("another-emulator")
    with pytest.raises(FileNotFoundError, match="holds emulator another-emulator"):
        emulator_folder(str(folder), messages[0].content)
