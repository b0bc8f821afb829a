"""The server's held-out set: the rows every global adapter is scored on, tokenized once."""

from __future__ import annotations

import torch

from fedinstruct.config import RunConfig
from fedinstruct.data import build_prompt, tokenize_dataset
from fedinstruct.data.federated import test_dataset
from fedinstruct.metrics import EvalResult, evaluate_model


class HeldOutSet:
    """Held-out loss and Rouge-L (and final-number accuracy where the answers allow it)."""

    def __init__(self, cfg: RunConfig, tokenizer) -> None:
        self.cfg = cfg
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

    def evaluate(self, model: torch.nn.Module, tokenizer) -> EvalResult:
        return evaluate_model(
            model,
            tokenizer,
            self.examples,
            self.prompts,
            self.references,
            max_new_tokens=self.cfg.eval.max_new_tokens,
            batch_size=self.cfg.eval.batch_size,
        )
