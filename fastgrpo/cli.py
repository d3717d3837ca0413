"""`fastgrpo` command line: train, eval, config, info.

User mistakes (bad config, missing files, wrong model directory) print one line `fastgrpo: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from fastgrpo.errors import FastGRPOError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML config file or packaged config name (default: the embedded 'default')")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgrpo", description="GRPO safety post-training for diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train (with no arguments: the embedded default run)")
    _add_config_arguments(train)
    # Arguments the DeepSpeed launcher passes (`deepspeed fastgrpo/train.py ...`).
    train.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    train.add_argument("--deepspeed_config", default=None, metavar="FILE",
                       help="DeepSpeed JSON config (same as engine.deepspeed=FILE)")
    evaluate = commands.add_parser("eval", help="compare a run's newest checkpoint with its base model (toy world: "
                                                "judged unsafe rate, accuracy, content kept)")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="a run's output directory")
    evaluate.add_argument("--samples-per-prompt", type=int, default=4, help="images per evaluation prompt")
    evaluate.add_argument("--seed", type=int, default=1234, help="seed of the evaluation noise (shared by both models)")
    evaluate.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]'")
    show = commands.add_parser("config", help="print the resolved config with a comment per field")
    _add_config_arguments(show)
    show.add_argument("--markdown", action="store_true", help="print the reference table of every key instead")
    commands.add_parser("info", help="print which backend serves each op on each device, and why")
    return parser


def _run(args) -> int:
    if args.command == "info":
        from fastgrpo.info import main as info_main
        return info_main()
    if args.command == "eval":
        from fastgrpo.evaluate import evaluate
        out_dir = evaluate(args.run_dir, samples_per_prompt=args.samples_per_prompt, seed=args.seed,
                           device=args.device)
        sys.stdout.write((out_dir / "report.md").read_text(encoding="utf-8").split("\n\n![")[0] + "\n")
        print(f"fastgrpo: report written to {out_dir}")
        return 0
    from fastgrpo.config import load_config, render_markdown, render_yaml

    if args.command == "config" and args.markdown:
        sys.stdout.write(render_markdown())
        return 0
    overrides = list(args.overrides)
    if getattr(args, "deepspeed_config", None):
        overrides.append(f"engine.deepspeed={args.deepspeed_config}")
    config = load_config(args.config, overrides)
    if args.command == "config":
        sys.stdout.write(render_yaml(config))
        return 0
    from fastgrpo.train import train

    output_dir = train(config)
    print(f"fastgrpo: done; outputs in {output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except FastGRPOError as error:
        print(f"fastgrpo: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as error:
        print(f"fastgrpo: interrupted{'; ' + str(error) if str(error) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
