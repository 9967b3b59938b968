"""The `gsmtune` command: one thin function per verb; user mistakes become one line and exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gsmtune.errors import GsmtuneError
from gsmtune.export import TYPES as EXPORT_TYPES

CONFIGS = Path(__file__).resolve().parent / "configs"


def _config_path(name: str) -> Path:
    """A path as given, or the name of a config shipped with the package (`quickstart`, `cpu/zero_shot`)."""
    path = Path(name)
    if path.exists():
        return path
    shipped = CONFIGS / (name if name.endswith(".yaml") else name + ".yaml")
    return shipped if shipped.exists() else path


def cmd_eval(args: argparse.Namespace) -> None:
    from gsmtune.config import load_config
    from gsmtune.evaluate import format_metrics, run_eval

    cfg = load_config(_config_path(args.config), args.overrides)
    metrics = run_eval(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"{cfg.output_dir}: {format_metrics(metrics)}")


def cmd_train(args: argparse.Namespace) -> None:
    from gsmtune.config import load_config
    from gsmtune.training.driver import run_train

    cfg = load_config(_config_path(args.config), args.overrides)
    print(f"trained model: {run_train(cfg, resume=args.resume, overwrite=args.overwrite)}")


def cmd_run(args: argparse.Namespace) -> None:
    """Train, then evaluate the trained model with the same config, then compare with the baseline run if named."""
    from gsmtune.config import load_config
    from gsmtune.evaluate import run_eval
    from gsmtune.training.common import is_main_process
    from gsmtune.training.driver import run_train

    cfg = load_config(_config_path(args.config), args.overrides)
    model_dir = run_train(cfg, resume=args.resume, overwrite=args.overwrite)
    if not is_main_process():  # under accelerate launch, rank 0 evaluates
        return
    metrics = run_eval(cfg, resume=True, model_path=str(model_dir))
    print(side_by_side(cfg, metrics))


def side_by_side(cfg, metrics: dict) -> str:
    import json

    from gsmtune.evaluate import format_metrics
    from gsmtune.runs import METRICS

    lines = [f"{'tuned':>8} {cfg.output_dir}: {format_metrics(metrics)}"]
    if cfg.baseline_run:
        path = Path(cfg.baseline_run) / METRICS
        base = format_metrics(json.loads(path.read_text())) if path.exists() else f"no {METRICS} yet: evaluate it first"
        lines.insert(0, f"{'baseline':>8} {cfg.baseline_run}: {base}")
    return "\n".join(lines)


def cmd_merge(args: argparse.Namespace) -> None:
    from gsmtune.models import is_adapter
    from gsmtune.training.common import merge_adapter

    adapter = Path(args.adapter)
    if not is_adapter(adapter):
        raise GsmtuneError(f"{adapter} holds no adapter_config.json; give the LoRA folder (RUN/model)")
    print(f"merged model: {merge_adapter(adapter, Path(args.output))}")


def cmd_export(args: argparse.Namespace) -> None:
    from gsmtune.export import export_gguf

    out = export_gguf(args.model, args.gguf, args.type)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB, {args.type})")


def cmd_sweep(args: argparse.Namespace) -> None:
    from gsmtune.training.sweep import run_sweep

    summary = run_sweep(_config_path(args.config), args.overrides, args.trials, args.storage)
    print(f"best validation accuracy {summary['best_value']:.1%} with {summary['best_params']}")


def cmd_compare(args: argparse.Namespace) -> None:
    from gsmtune.report import comparison_markdown, write_comparison_csv
    from gsmtune.runs import load_run

    runs = [load_run(p, p) for p in args.runs]
    text = comparison_markdown(runs)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.csv:
        write_comparison_csv(runs, Path(args.csv))


def cmd_analyze(args: argparse.Namespace) -> None:
    from gsmtune.report import analysis_markdown
    from gsmtune.runs import load_run

    baseline = load_run(args.baseline, args.baseline) if args.baseline else None
    print(analysis_markdown(load_run(args.run, args.run), baseline, args.examples))


def cmd_report(args: argparse.Namespace) -> None:
    from gsmtune.report import build_report
    from gsmtune.runs import find_runs_in

    out = Path(args.output)
    markdown = Path(args.markdown) if args.markdown else out.with_suffix(".md")
    build_report(find_runs_in(args.runs), out, markdown)
    print(f"report: {out} (markdown: {markdown})")


def cmd_quickstart(args: argparse.Namespace) -> None:
    """Base model, then a short LoRA run, evaluated on the same problems; reruns reuse finished work."""
    from gsmtune.config import load_config
    from gsmtune.evaluate import run_eval
    from gsmtune.training.driver import run_train

    out = load_config(CONFIGS / "quickstart.yaml", args.overrides).output_dir
    base = load_config(CONFIGS / "quickstart.yaml", [*args.overrides, f"output_dir={out}/base"])
    tuned = load_config(CONFIGS / "quickstart.yaml", [*args.overrides, f"output_dir={out}/lora", f"baseline_run={out}/base"])
    run_eval(base, resume=not args.overwrite, overwrite=args.overwrite)
    model_dir = run_train(tuned, resume=not args.overwrite, overwrite=args.overwrite)
    print(side_by_side(tuned, run_eval(tuned, resume=True, model_path=str(model_dir))))


def cmd_ask(args: argparse.Namespace) -> None:
    from gsmtune.ask import ask, ask_config, questions_from

    questions = questions_from(args.questions, sys.stdin)
    flags = {"prompt.strategy": args.strategy, "prompt.instruction": args.instruction,
             "prompt.chat_template": args.chat_template, "generation.max_new_tokens": args.max_new_tokens,
             "generation.calculator": args.calculator or None, "generation.num_samples": args.samples,
             "generation.do_sample": True if args.samples and args.samples > 1 else None, "model.dtype": args.dtype}
    ask(ask_config(args.model, [f"{k}={v}" for k, v in flags.items() if v is not None]), questions)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsmtune", description="Fine-tune and evaluate small LMs on GSM8K.")
    sub = parser.add_subparsers(dest="command", required=True)

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. num_eval_samples=50")
        p.add_argument("--resume", action="store_true", help="continue the run in output_dir")
        p.add_argument("--overwrite", action="store_true", help="replace the run in output_dir")

    p = sub.add_parser("eval", help="evaluate a model on GSM8K with a prompt strategy")
    p.add_argument("config", help="YAML config file (or a shipped config name such as cpu/one_shot)")
    run_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="fine-tune (full, LoRA, QLoRA) with the config's training settings")
    p.add_argument("config")
    run_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="train, evaluate the trained model, print it beside baseline_run")
    p.add_argument("config")
    run_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model (safetensors)")
    p.add_argument("adapter", help="the adapter folder (RUN/model)")
    p.add_argument("-o", "--output", required=True, help="folder for the merged model")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write a model (an adapter merged into its base) as one GGUF file for llama.cpp")
    p.add_argument("model", help="RUN/model (adapter or full model folder), a model folder or bundled:gemma-3-270m")
    p.add_argument("--gguf", required=True, help="the file to write (NAME.gguf)")
    p.add_argument("--type", default="f32", choices=EXPORT_TYPES,
                   help="weights: f32 (exact), f16, q8_0 (8-bit); norms stay f32")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sweep", help="Optuna hyper-parameter search on the validation split; resumable")
    p.add_argument("config", help="a config with sweep.space and dataset.validation_size > 0")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--trials", type=int, required=True, help="finished trials to reach")
    p.add_argument("--storage", help="Optuna storage URL shared by several machines (default: OUTPUT/sweep.db)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", help="accuracy table with CIs and paired tests (McNemar, bootstrap) between runs")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--markdown", help="also write the tables to this markdown file")
    p.add_argument("--csv", help="also write the accuracy table to this CSV file")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("analyze", help="error categories of a run, and fixed/broken problems against a baseline")
    p.add_argument("run")
    p.add_argument("--baseline", help="a run on the same problems (e.g. the base model)")
    p.add_argument("--examples", type=int, default=3, help="examples shown per category")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("report", help="one self-contained HTML report (and markdown) for every run under the folders")
    p.add_argument("runs", nargs="+", help="run folders, or folders holding runs")
    p.add_argument("-o", "--output", default="report.html")
    p.add_argument("--markdown", help="markdown copy (default: OUTPUT with .md; plots in OUTPUT_files/)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("ask", help="ask a model (base, trained run, adapter) your own question; streams the answer")
    p.add_argument("model", help="a run folder, RUN/model, an adapter or model folder, a Hub id or bundled:gemma-3-270m")
    p.add_argument("questions", nargs="+", metavar="QUESTION", help="in quotes; '-' reads one question per line from stdin")
    p.add_argument("--strategy", choices=["zero_shot", "one_shot", "few_shot"], help="default: the run's own, else zero_shot")
    p.add_argument("--instruction", action=argparse.BooleanOptionalAction, help="the reference study's instruction")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, help="the tokenizer's chat template")
    p.add_argument("--calculator", action="store_true", help="compute the results of <<expression=...>> annotations")
    p.add_argument("--samples", type=int, help="k > 1: k sampled answers beside the greedy one, and their majority vote")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--dtype", help="auto (default), bf16 or fp32")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("quickstart", help="offline demo: evaluate the bundled Gemma 3 270M, LoRA-tune it briefly, evaluate again")
    run_options(p)
    p.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting key=value overrides at the first flag; gather the ones after it too
    if any(not item.partition("=")[1] or item.startswith("-") for item in extra) or not hasattr(args, "overrides"):
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    else:
        args.overrides += extra
    try:
        args.func(args)
    except GsmtuneError as e:
        print(f"gsmtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gsmtune: interrupted; rerun the same command with --resume to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
