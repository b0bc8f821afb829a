"""Task metrics against hand-computed answers; option scoring on a real tiny model; the
held-out set's options and answers read from a dataset's choices column."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from fedinstruct.config import ConfigError
from fedinstruct.metrics import (
    EvalResult,
    choice_accuracy,
    choice_index,
    exact_match,
    final_number,
    normalize_answer,
    numeric_match,
)


def test_exact_match_normalizes_as_squad_does():
    assert normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    predictions = ["The Cat.", "a dog", "Paris, France", "  42 "]
    references = ["cat", "dog", "Paris", "42"]
    assert exact_match(predictions, references) == 3 / 4  # "paris france" != "paris"
    assert exact_match([], []) == 0.0


def test_final_number_takes_gsm8k_answers_then_the_last_number():
    assert final_number("She has 3 apples, then 5 more.\n#### 8") == Decimal(8)
    assert final_number("#### 1,234 and later 7") == Decimal(1234)
    assert final_number("It costs $1,000,000.50 in all") == Decimal("1000000.50")
    assert final_number("first 3, then -4.5") == Decimal("-4.5")
    assert final_number("pages 3-4") == Decimal(4)  # a range's dash is no minus sign
    assert final_number("sorted: 1,2,3") == Decimal(3)  # no thousands grouping there
    assert final_number("no number") is None


def test_numeric_match_compares_values_and_leaves_out_rows_without_a_number():
    references = ["Natalia sold 48 clips... #### 72", "#### 1,000", "The answer is 5", "none"]
    predictions = ["72", "so 1000.0 in total", "#### 6", "anything 3"]
    assert numeric_match(predictions, references) == 2 / 3
    assert numeric_match(["1"], ["no number"]) is None
    assert numeric_match(["no answer"], ["#### 4"]) == 0.0


def test_choice_index_by_text_then_index_then_letter():
    options = ["red", "green", "blue"]
    assert choice_index(" green ", options) == 1
    assert choice_index("2", options) == 2
    assert choice_index("A", options) == 0
    assert choice_index("(c)", options) == 2
    assert choice_index("D", options) is None  # only three options
    assert choice_index("purple", options) is None
    assert choice_index("1", ["1", "2"]) == 0  # text wins over index


def test_choice_accuracy_picks_the_most_likely_option():
    scores = [[-1.0, -2.0], [-3.0, -0.5, -4.0], [-2.0, -2.0]]
    assert choice_accuracy(scores, [0, 1, 1]) == 2 / 3  # a tie goes to the first option


def test_eval_result_reports_each_metric_under_the_prefix():
    result = EvalResult(loss=1.5, rouge_l=None, generations=[],
                        scores={"exact_match": 0.25, "choice_accuracy": 1.0})
    assert result.as_metrics("emu_eval") == {
        "emu_eval_loss": 1.5, "emu_eval_exact_match": 0.25, "emu_eval_choice_accuracy": 1.0}


def test_eval_metrics_are_validated(tiny_config):
    assert tiny_config().eval.metrics == ["loss", "rougeL"]
    with pytest.raises(ConfigError, match=r"eval.metrics must be one of .* got 'accuracy'"):
        tiny_config("eval.metrics=[loss,accuracy]")
    with pytest.raises(ConfigError, match="each metric once"):
        tiny_config("eval.metrics=[loss,loss]")


# -- options from a dataset column -----------------------------------------------------------
ROWS = [
    {"instruction": "Which is a fruit?", "response": "apple", "choices": ["car", "apple"]},
    {"instruction": "Pick the colour.", "response": "B", "choices": ["dog", "red", "sky"]},
    {"instruction": "2 + 2 = ?", "response": "0", "choices": ["4", "5"]},
    {"instruction": "Largest?", "response": "elephant", "choices": ["ant", "elephant"]},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_held_out_options_come_from_the_choices_column(tmp_path, tiny_config):
    from fedinstruct.data.federated import test_dataset
    from fedinstruct.server.evaluation import check_held_out

    source = _jsonl(tmp_path / "mc.jsonl", ROWS)
    cfg = tiny_config("dataset=custom", f"dataset.source={source}",
                      f"dataset.test_source={source}", "dataset.partitioner=iid",
                      "eval.metrics=[choice_accuracy]", "eval.max_samples=0")
    data = test_dataset(cfg)
    options, answers = check_held_out(cfg, data)
    by_instruction = {row["instruction"]: (opts, answer)
                      for row, opts, answer in zip(data, options, answers, strict=True)}
    assert by_instruction == {"Which is a fruit?": (["car", "apple"], 1),
                              "Pick the colour.": (["dog", "red", "sky"], 1),
                              "2 + 2 = ?": (["4", "5"], 0),
                              "Largest?": (["ant", "elephant"], 1)}

    bad = _jsonl(tmp_path / "bad.jsonl", [*ROWS[:2], {**ROWS[2], "choices": ["4"]}])
    cfg = tiny_config("dataset=custom", f"dataset.source={bad}", f"dataset.test_source={bad}",
                      "dataset.partitioner=iid", "eval.metrics=[loss,choice_accuracy]")
    with pytest.raises(ValueError, match=r"bad.jsonl, row 2, field 'choices': expected a list "
                                         "of at least 2 non-empty option strings"):
        check_held_out(cfg, test_dataset(cfg))
    wrong = _jsonl(tmp_path / "wrong.jsonl", [ROWS[0], {**ROWS[1], "response": "Z"}])
    cfg = tiny_config("dataset=custom", f"dataset.source={wrong}",
                      f"dataset.test_source={wrong}", "dataset.partitioner=iid",
                      "eval.metrics=[choice_accuracy]")
    with pytest.raises(ValueError, match=r"wrong.jsonl, row 1: the response 'Z' is none of "):
        check_held_out(cfg, test_dataset(cfg))


def test_metrics_the_data_cannot_give_fail_before_any_model(tiny_config):
    from fedinstruct.data.federated import test_dataset
    from fedinstruct.server.evaluation import check_held_out

    cfg = tiny_config("eval.metrics=[choice_accuracy]")
    with pytest.raises(ConfigError, match="the synthetic dataset has no options"):
        check_held_out(cfg, test_dataset(cfg))
    cfg = tiny_config("eval.metrics=[numeric_match]")  # synthetic answers include numbers
    assert check_held_out(cfg, test_dataset(cfg)) == (None, None)


# -- log-likelihood scoring on a real tiny model ----------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    from fedinstruct.compose import compose_config
    from fedinstruct.model import load_base_model

    cfg = compose_config(["model=tiny", "model.quantization=none"])
    return load_base_model(cfg.model, quantize=False)


def _reference_log_likelihood(model, tokenizer, prompt: str, option: str) -> float:
    """One sequence, no padding: the sum of log P(token | before) over the option's tokens."""
    import torch

    from fedinstruct.data import tokenize_example

    example = tokenize_example(tokenizer, prompt, option, max_length=10_000)
    ids = torch.tensor([example.input_ids[:-1]])  # no end token
    labels = example.labels[:-1]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(log_probs[i - 1, labels[i]]) for i in range(1, len(labels))
               if labels[i] != -100)


def test_option_log_likelihoods_match_a_token_by_token_sum(tiny_model):
    from fedinstruct.metrics import option_log_likelihoods

    model, tokenizer = tiny_model
    prompts = ["Which is a fruit?", "Name a colour, please, in one word."]
    options = [["car", "a ripe yellow banana", "apple"], ["red", "dark ocean blue"]]
    batched = option_log_likelihoods(model, tokenizer, prompts, options, batch_size=4)
    for prompt, row_options, scores in zip(prompts, options, batched, strict=True):
        expected = [_reference_log_likelihood(model, tokenizer, prompt, o) for o in row_options]
        assert scores == pytest.approx(expected, abs=1e-3)
        assert all(s < 0 for s in scores)


def test_choice_accuracy_in_evaluate_model_on_a_tiny_model(tiny_model):
    from fedinstruct.metrics import evaluate_model, option_log_likelihoods

    model, tokenizer = tiny_model
    prompts = ["Which is a fruit?", "2 + 2 = ?", "Pick the colour."]
    options = [["car", "apple"], ["4", "5", "22"], ["dog", "red"]]
    scores = option_log_likelihoods(model, tokenizer, prompts, options, batch_size=2)
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    worst = [min(range(len(s)), key=s.__getitem__) for s in scores]
    result = evaluate_model(model, tokenizer, [], prompts, ["x"] * 3, max_new_tokens=1,
                            metrics=["choice_accuracy"], options=options, answers=best)
    assert result.as_metrics("eval") == {"eval_choice_accuracy": 1.0}
    assert result.generations == []  # nothing generated for a likelihood metric
    result = evaluate_model(model, tokenizer, [], prompts, ["x"] * 3, max_new_tokens=1,
                            metrics=["choice_accuracy"], options=options, answers=worst)
    assert result.scores == {"choice_accuracy": 0.0}


def test_generation_metrics_on_the_first_rows_only(tiny_model):
    from fedinstruct.metrics import evaluate_model

    model, tokenizer = tiny_model
    prompts = ["Say hi.", "Name a colour.", "Count to three."]
    result = evaluate_model(model, tokenizer, [], prompts, ["hi", "red", "1 2 3"],
                            max_new_tokens=2, metrics=["rougeL"], generate_rows=2)
    assert len(result.generations) == 2  # rows after the first two are not generated
    assert result.rouge_l is not None
