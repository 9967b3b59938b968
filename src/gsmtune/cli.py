"""The `gsmtune` command: one thin function per verb; user mistakes become one line and exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gsmtune.errors import GsmtuneError

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


def cmd_quickstart(args: argparse.Namespace) -> None:
    args.config = str(CONFIGS / "quickstart.yaml")
    cmd_eval(args)


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

    p = sub.add_parser("quickstart", help="offline demo: the bundled Gemma 3 270M on generated GSM8K-style problems")
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
