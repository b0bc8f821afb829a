"""Instruction data: loading and validation, the offline synthetic set, client partitioning,
prompt templates and tokenization."""

from fedinstruct.data.loading import (
    CONTRACT_COLUMNS,
    DatasetError,
    FieldMap,
    count_prepartitions,
    load_instruction_dataset,
    load_prepartitioned,
    load_prepartitioned_test,
)
from fedinstruct.data.partition import (
    SCHEMES,
    CategoryShardPartitioner,
    holdout_per_category,
    partition_dataset,
)
from fedinstruct.data.prompts import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    TokenizedExample,
    build_prompt,
    pad_batch,
    tokenize_dataset,
    tokenize_example,
)
from fedinstruct.data.synthetic import SYNTHETIC_FAMILIES, make_synthetic_dataset

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "CONTRACT_COLUMNS",
    "IGNORE_INDEX",
    "SCHEMES",
    "SYNTHETIC_FAMILIES",
    "CategoryShardPartitioner",
    "DatasetError",
    "FieldMap",
    "TokenizedExample",
    "build_prompt",
    "count_prepartitions",
    "holdout_per_category",
    "load_instruction_dataset",
    "load_prepartitioned",
    "load_prepartitioned_test",
    "make_synthetic_dataset",
    "pad_batch",
    "partition_dataset",
    "tokenize_dataset",
    "tokenize_example",
]
