"""`fedinstruct eval`, `generate` and `export` on the folder of a real 1-round tiny run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a Flower simulation, then CLI processes that load the model

CLI = [sys.executable, "-m", "fedinstruct.cli"]
RUN = ["model=tiny", "num_rounds=1", "federation.num_clients=2", "federation.min_train_nodes=2",
       "federation.min_available_nodes=2", "train.local_steps=4", "train.lr=1e-2",
       "train.max_length=96", "dataset.samples_per_client=16", "eval.max_samples=6",
       "eval.max_new_tokens=6"]


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from fedinstruct.compose import compose_config
    from fedinstruct.simulation import simulate

    folder = tmp_path_factory.mktemp("use") / "run"
    return simulate(compose_config([*RUN, f"output_dir={folder}"]))


def test_eval_scores_a_saved_adapter_as_the_server_did(run_dir):
    from fedinstruct.server.output import read_metrics
    from fedinstruct.use import evaluate_run

    final = read_metrics(run_dir)[-1]
    result = evaluate_run(run_dir)
    assert result["rows"] == 6 and result["adapter"].endswith("adapters/final")
    assert result["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-4)
    assert result["eval_rougeL"] == pytest.approx(final["eval_rougeL"], abs=1e-6)

    missing = _cli("eval", str(run_dir), "--round", "7")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == (
        f"fedinstruct: {run_dir}/adapters/round_007 holds no adapter (rounds saved in "
        f"{run_dir}/adapters: 1)")


def test_eval_on_a_file_with_the_task_metrics(run_dir, tmp_path):
    rows = [
        {"instruction": "Which is a fruit?", "response": "apple", "choices": ["car", "apple"]},
        {"instruction": "What is 2 + 3?", "response": "5", "choices": ["6", "5"]},
        {"instruction": "Pick one.", "response": "B", "choices": ["x", "y", "z"]},
    ]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = _cli("eval", str(run_dir), "--round", "1", "--data", str(data), "--json",
                "--metrics", "loss,exact_match,numeric_match,choice_accuracy")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows"] == 3 and result["adapter"].endswith("adapters/round_001")
    assert set(result) == {"adapter", "rows", "eval_loss", "eval_exact_match",
                           "eval_numeric_match", "eval_choice_accuracy"}
    assert result["eval_loss"] > 0
    # choice_accuracy: thirds of 3 rows; numeric_match: the one row with a number
    assert result["eval_choice_accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert result["eval_numeric_match"] in (0.0, 1.0)


def test_generate_answers_a_prompt_and_a_prompt_per_line(run_dir):
    from fedinstruct.use import generate_answers

    prompts = ["What is 2 + 3?", "Name the capital of France."]
    expected = list(generate_answers(run_dir, prompts, max_new_tokens=5))
    one = _cli("generate", str(run_dir), prompts[0], "--max-new-tokens", "5")
    assert one.returncode == 0, one.stderr[-3000:]
    assert one.stdout == expected[0] + "\n"
    loop = _cli("generate", str(run_dir), "-i", "--max-new-tokens", "5",
                stdin="\n".join(prompts) + "\n")
    assert loop.returncode == 0, loop.stderr[-3000:]
    assert loop.stdout == "".join(answer + "\n" for answer in expected)


def test_export_merges_into_a_model_folder_transformers_loads(run_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedinstruct.model import load_base_model
    from fedinstruct.use import load_run_config

    out = tmp_path / "merged"
    done = _cli("export", str(run_dir), "--merge", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(out)
    again = _cli("export", str(run_dir), "--merge", str(out))
    assert again.returncode == 2 and "exists and is not empty (--force replaces it)" in (
        again.stderr)

    merged = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    base, _ = load_base_model(load_run_config(run_dir).model, quantize=False)
    ids = tokenizer("### Instruction:\nWhat is 2 + 3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(run_dir / "adapters" / "final"))
        expected = tuned(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert (expected - plain).abs().max() > 1e-4, "the adapter changed nothing to compare"
