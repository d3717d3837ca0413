"""`fastgrpo` command line: train, eval, config, info.

User mistakes (bad config, missing files, wrong model directory) print one line `fastgrpo: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from fastgrpo.commandline import add_config_arguments, add_train_arguments, config_from_args, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgrpo", description="GRPO safety post-training for diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train (with no arguments: the embedded default run)")
    add_train_arguments(train)
    evaluate = commands.add_parser("eval", help="compare a run's newest checkpoint with its base model (toy world: "
                                                "judged unsafe rate, accuracy, content kept)")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="a run's output directory")
    evaluate.add_argument("--samples-per-prompt", type=int, default=4, help="images per evaluation prompt")
    evaluate.add_argument("--seed", type=int, default=1234, help="seed of the evaluation noise (shared by both models)")
    evaluate.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]'")
    show = commands.add_parser("config", help="print the resolved config with a comment per field")
    add_config_arguments(show)
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
    from fastgrpo.config import render_markdown, render_yaml

    if args.command == "config" and args.markdown:
        sys.stdout.write(render_markdown())
        return 0
    config = config_from_args(args)
    if args.command == "config":
        sys.stdout.write(render_yaml(config))
        return 0
    from fastgrpo.train import run_from_config
    return run_from_config(config)


def main(argv: list[str] | None = None) -> int:
    return run_command(_run, build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
