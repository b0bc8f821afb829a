"""Use a finished run's adapter: `fedinstruct eval`, `fedinstruct generate`, `fedinstruct export`.

    fedinstruct eval RUN_DIR [--round N] [--data FILE] [--metrics loss,exact_match] [KEY=VALUE...]
    fedinstruct generate RUN_DIR "prompt"        # or -i: one prompt per line, until EOF
    fedinstruct export RUN_DIR --merge OUT       # a full model folder, tokenizer included

Each loads the base model the run used (RUN_DIR/config.yaml, the resolved config) and the PEFT
adapter the run saved (RUN_DIR/adapters/final, or adapters/round_NNN with --round N).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from fedinstruct.compose import to_run_config
from fedinstruct.config import ConfigError, RunConfig
from fedinstruct.logs import set_verbose, setup_logging
from fedinstruct.server.output import CONFIG_FILE

log = logging.getLogger("fedinstruct.use")

ADAPTERS = "adapters"


class UsageError(ValueError):
    """A command that cannot run as asked: the message says why."""


# -- the run folder --------------------------------------------------------------------------
def load_run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The run's resolved config, with `key=value` overrides, validated."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(run_dir).expanduser() / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{path.parent} holds no {CONFIG_FILE}: not a fedinstruct run folder")
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise UsageError(f"expected key=value overrides, got {' '.join(bad)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig),
                                 yaml.safe_load(path.read_text()) or {},
                                 OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path} with {' '.join(overrides) or 'no overrides'}: "
                          f"{str(err).splitlines()[0]}") from err
    return to_run_config(merged)  # type: ignore[arg-type]


def adapter_folder(run_dir: str | Path, round_: int | None = None) -> Path:
    """adapters/final, or adapters/round_NNN for `round_`; a missing one names the rounds kept."""
    adapters = Path(run_dir).expanduser() / ADAPTERS
    folder = adapters / ("final" if round_ is None else f"round_{round_:03d}")
    if (folder / "adapter_config.json").is_file():
        return folder
    kept = sorted(int(p.name[6:]) for p in adapters.glob("round_*")
                  if p.name[6:].isdigit() and (p / "adapter_config.json").is_file())
    have = ", ".join(map(str, kept)) if kept else "none"
    raise UsageError(f"{folder} holds no adapter (rounds saved in {adapters}: {have})")


def load_tuned_model(cfg: RunConfig, adapter: Path, *, quantize: bool = False):
    """The run's base model (quantized only if asked) with the adapter, ready for inference."""
    from peft import PeftModel

    from fedinstruct.model import load_base_model

    base, tokenizer = load_base_model(cfg.model, quantize=quantize)
    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    return model, tokenizer


def _round_name(adapter: Path) -> str:
    return "final" if adapter.name == "final" else f"round {int(adapter.name[6:])}"


# -- eval ------------------------------------------------------------------------------------
def evaluate_run(run_dir: str | Path, *, round_: int | None = None, data_file: str | None = None,
                 overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The metrics of a run's adapter on its own held-out rows (the server's, with
    `eval.max_samples`) or on every row of `data_file` (capped by an eval.max_samples
    override); returns the `eval_*` metrics and `rows`."""
    from fedinstruct.data import FieldMap, load_instruction_dataset
    from fedinstruct.data.federated import test_dataset
    from fedinstruct.server.evaluation import HeldOutSet, check_held_out, held_out_sources

    cfg = load_run_config(run_dir, overrides)
    adapter = adapter_folder(run_dir, round_)
    if data_file is None:
        data, sources = test_dataset(cfg), None
        if "choice_accuracy" in cfg.eval.metrics:
            sources = held_out_sources(cfg)
    else:
        f = cfg.dataset.fields
        data = load_instruction_dataset(data_file, fmt=cfg.dataset.format, fields=FieldMap(
            instruction=f.instruction, context=f.context, response=f.response,
            category=f.category))
        if any(o.startswith("eval.max_samples=") for o in overrides) and cfg.eval.max_samples:
            data = data.select(range(min(cfg.eval.max_samples, len(data))))
        sources = [data_file]
    check_held_out(cfg, data, sources)  # before the model loads
    model, tokenizer = load_tuned_model(cfg, adapter, quantize=cfg.eval.quantized_base)
    held_out = HeldOutSet(cfg, tokenizer, data=data, sources=sources)
    metrics: dict[str, Any] = held_out.evaluate(model, tokenizer).as_metrics("eval")
    return {"adapter": str(adapter), "rows": len(data), **metrics}


def _print_metrics(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    print(f"{result['adapter']}: {result['rows']} rows")
    width = max(len(k) for k in result)
    for key, value in result.items():
        if key.startswith("eval_"):
            print(f"  {key:<{width}}  {value:.4f}")


# -- generate --------------------------------------------------------------------------------
def _prompts(args: argparse.Namespace):
    if not args.interactive:
        yield args.prompt
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print("One prompt per line; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return
        if not line.strip():
            if interactive:
                return
            continue
        yield line


def generate_answers(run_dir: str | Path, prompts, *, round_: int | None = None,
                     context: str = "", raw: bool = False, max_new_tokens: int = 128):
    """Greedy answers of the run's adapter, one per prompt (an iterable: read lazily), each
    prompt in the run's template (`train.template`) unless `raw`."""
    from fedinstruct.data import build_prompt
    from fedinstruct.metrics import generate

    cfg = load_run_config(run_dir)
    model, tokenizer = load_tuned_model(cfg, adapter_folder(run_dir, round_))
    for prompt in prompts:
        text = prompt if raw else build_prompt({"instruction": prompt, "context": context},
                                               cfg.train.template, tokenizer)
        yield generate(model, tokenizer, [text], max_new_tokens=max_new_tokens)[0]


# -- export ----------------------------------------------------------------------------------
def export_merged(run_dir: str | Path, out: str | Path, *, round_: int | None = None,
                  force: bool = False) -> Path:
    """The base model with the adapter merged in, as a folder that
    `AutoModelForCausalLM.from_pretrained(out)` loads, tokenizer included."""
    from fedinstruct.files import atomic_folder

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UsageError(f"{out} exists and is not empty (--force replaces it)")
    cfg = load_run_config(run_dir)
    adapter = adapter_folder(run_dir, round_)
    model, tokenizer = load_tuned_model(cfg, adapter)
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    if cfg.model.gguf_file:  # dequantized on load: saved as plain weights
        merged.hf_quantizer = None
        merged.config.quantization_config = None
        del merged.config.quantization_config

    def build(folder: Path) -> None:
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    atomic_folder(out, build, replace=out.exists())
    log.info("Merged %s (%s) into %s", run_dir, _round_name(adapter), out)
    return out


# -- command line ----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedinstruct", description=__doc__.split("\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's folder")
    common.add_argument("--round", type=int, dest="round_", metavar="N",
                        help="the adapter of round N (default: the final one)")
    common.add_argument("-v", "--verbose", action="store_true", help="show every log line")
    common.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True)

    ev = commands.add_parser("eval", parents=[common], help="metrics of a run's adapter",
                             description="Evaluate a run's adapter on its held-out rows, or on "
                             "every row of --data, and print the metrics.")
    ev.add_argument("--data", metavar="FILE", help="a JSON/JSONL/CSV/Parquet file or folder, "
                    "read with the run's dataset.format and dataset.fields")
    ev.add_argument("--metrics", help="comma-separated, e.g. loss,rougeL,exact_match "
                    "(default: the run's eval.metrics)")
    ev.add_argument("--max-samples", type=int, metavar="N", help="rows to score (0: all)")
    ev.add_argument("--max-new-tokens", type=int, metavar="N", help="generation length")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="config overrides, e.g. dataset.fields.response=answer "
                    "eval.choices_column=options")

    gen = commands.add_parser("generate", parents=[common], help="answer prompts",
                              description="Answer a prompt (or, with -i, one per input line) "
                              "with a run's adapter, greedily.")
    gen.add_argument("prompt", nargs="?", help="the instruction")
    gen.add_argument("-i", "--interactive", action="store_true",
                     help="read prompts from the terminal or stdin, one per line")
    gen.add_argument("--context", default="", help="an input/context for the instruction")
    gen.add_argument("--raw", action="store_true", help="send the prompt without the template")
    gen.add_argument("--max-new-tokens", type=int, default=128, metavar="N")

    ex = commands.add_parser("export", parents=[common], help="merge the adapter into the base",
                             description="Write the base model with the adapter merged in.")
    ex.add_argument("--merge", required=True, metavar="OUT", help="the model folder to write")
    ex.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    return parser


def _eval_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.metrics:
        names = ",".join(m.strip() for m in args.metrics.split(",") if m.strip())
        overrides.append(f"eval.metrics=[{names}]")
    if args.max_samples is not None:
        overrides.append(f"eval.max_samples={args.max_samples}")
    if args.max_new_tokens is not None:
        overrides.append(f"eval.max_new_tokens={args.max_new_tokens}")
    return overrides


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "eval":
        result = evaluate_run(args.run_dir, round_=args.round_, data_file=args.data,
                              overrides=_eval_overrides(args))
        _print_metrics(result, args.json)
    elif args.command == "generate":
        if args.interactive == (args.prompt is not None):
            raise UsageError("generate takes a prompt or -i, not both nor neither")
        answers = generate_answers(args.run_dir, _prompts(args), round_=args.round_,
                                   context=args.context, raw=args.raw,
                                   max_new_tokens=args.max_new_tokens)
        for answer in answers:
            print(answer, flush=True)
    else:
        print(export_merged(args.run_dir, args.merge, round_=args.round_, force=args.force))


def main(argv: Sequence[str]) -> int:
    """`fedinstruct eval|generate|export ...`; returns the exit status."""
    args = _parser().parse_args(list(argv))
    if args.verbose:
        set_verbose(True)
    setup_logging()  # before the libraries load: they read its settings on import

    from fedinstruct.data import DatasetError
    from fedinstruct.server.output import OutputInUse

    debug = args.debug or os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        _dispatch(args)
    except (UsageError, ConfigError, DatasetError, FileNotFoundError, OutputInUse) as err:
        if debug:
            raise
        print(f"fedinstruct: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
