"""What the server does with models: the initial adapter, held-out evaluation, export.

FedIT's server needs no quantized model to start: the initial adapter comes from the model's
config alone. A model is loaded (once, lazily) only for server-side evaluation.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from flwr.app import ArrayRecord
from peft import PeftModel, set_peft_model_state_dict

from fedinstruct import modeling
from fedinstruct.config import RunConfig
from fedinstruct.data import build_prompt, tokenize_dataset
from fedinstruct.evaluation import EvalResult, evaluate_model
from fedinstruct.run_data import test_dataset
from fedinstruct.run_output import RunOutput

log = logging.getLogger(__name__)


class HeldOutSet:
    """The server's evaluation rows, tokenized once."""

    def __init__(self, cfg: RunConfig, tokenizer) -> None:
        data = test_dataset(cfg)
        self.examples, self.stats = tokenize_dataset(
            data,
            tokenizer,
            template=cfg.train.template,
            max_length=cfg.train.max_length,
            mask_prompt=True,
        )
        self.prompts = [build_prompt(row, cfg.train.template, tokenizer) for row in data]
        self.references = list(data["response"])

    def evaluate(self, cfg: RunConfig, model: torch.nn.Module, tokenizer) -> EvalResult:
        return evaluate_model(
            model,
            tokenizer,
            self.examples,
            self.prompts,
            self.references,
            max_new_tokens=cfg.eval.max_new_tokens,
            batch_size=cfg.eval.batch_size,
        )


class AdapterServer:
    """FedIT's server side: one LoRA adapter is the global model."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self._model: PeftModel | None = None
        self._tokenizer = None
        self._held_out: HeldOutSet | None = None
        self._export_config = None

    # -- what crosses the wire --------------------------------------------------------------
    def initial_arrays(self) -> ArrayRecord:
        return ArrayRecord(modeling.initial_adapter_state(self.cfg.model, self.cfg.seed))

    def before_round(
        self, server_round: int, arrays: ArrayRecord
    ) -> tuple[ArrayRecord, dict[str, float]]:
        """Server work before a round's training (FedBiOT aligns its emulator here)."""
        return arrays, {}

    def after_aggregation(self, arrays: ArrayRecord, aggregated: ArrayRecord) -> ArrayRecord:
        """Combine the aggregated client update with the global state (identity for FedIT)."""
        return aggregated

    def adapter_state(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """The full-model adapter held in `arrays` (what is exported and evaluated)."""
        return arrays.to_torch_state_dict()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Extra server-side tensors a resumed run needs (none for FedIT)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        del tensors

    # -- evaluation and export --------------------------------------------------------------
    def _ensure_model(self) -> tuple[PeftModel, Any]:
        if self._model is None:
            base, self._tokenizer = modeling.load_base_model(
                self.cfg.model, quantize=self.cfg.eval.quantized_base
            )
            self._model = modeling.add_lora(base, self.cfg.model)
            self._held_out = HeldOutSet(self.cfg, self._tokenizer)
        return self._model, self._tokenizer

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        every = self.cfg.eval.every
        if every <= 0 or (server_round % every and server_round != self.cfg.num_rounds):
            return {}
        start = time.perf_counter()
        model, tokenizer = self._ensure_model()
        set_peft_model_state_dict(model, self.adapter_state(arrays))
        result = self._held_out.evaluate(self.cfg, model, tokenizer)
        metrics = {"eval_loss": result.loss, "eval_rougeL": result.rouge_l}
        if result.accuracy is not None:
            metrics["eval_accuracy"] = result.accuracy
        metrics["time_eval"] = time.perf_counter() - start
        return metrics

    def export(self, output: RunOutput, server_round: int, arrays: ArrayRecord) -> None:
        if self._export_config is None:  # resolve the base model's path once, not every round
            base_path = modeling.resolve_model_path(self.cfg.model)
            self._export_config = modeling.lora_config(
                self.cfg.model, base_model_name_or_path=base_path
            )
        output.save_adapter(server_round, self.adapter_state(arrays), self._export_config)
