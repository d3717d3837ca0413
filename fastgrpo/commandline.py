"""What `fastgrpo train` and `deepspeed fastgrpo/train.py` share: the training arguments, how they become a config,
and how a command ends (argparse only; importing this module loads no model code).

A user mistake (`FastGRPOError`: bad config, missing files, wrong model directory) prints one line
`fastgrpo: error: ...` and exits 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys

from fastgrpo.errors import FastGRPOError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML config file or packaged config name (default: the embedded 'default')")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    # Arguments the DeepSpeed launcher passes (`deepspeed fastgrpo/train.py ...`).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deepspeed_config", default=None, metavar="FILE",
                        help="DeepSpeed JSON config (same as engine.deepspeed=FILE)")


def epoch_hooks(config) -> list:
    """What a training command adds to the epoch lines: a packaged toy-world model's pixel judge."""
    from fastgrpo.toyworld.monitor import judge_hooks

    return judge_hooks(config.model.pretrained)


def config_from_args(args):
    """The validated Config of parsed config arguments (ConfigError, one line, when it is not valid)."""
    from fastgrpo.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "deepspeed_config", None):
        overrides.append(f"engine.deepspeed={args.deepspeed_config}")
    return load_config(args.config, overrides)


def run_command(fn, *args) -> int:
    """fn(*args) as a command: its exit code, or one line and 2 for a user mistake, 130 for Ctrl-C."""
    try:
        return fn(*args)
    except FastGRPOError as error:
        print(f"fastgrpo: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as error:
        print(f"fastgrpo: interrupted{'; ' + str(error) if str(error) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
