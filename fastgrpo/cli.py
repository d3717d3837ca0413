"""`fastgrpo` command line: train, eval, config, info.

User mistakes (bad config, missing files, wrong model directory) print one line `fastgrpo: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from fastgrpo.commandline import (add_config_arguments, add_train_arguments, config_from_args, epoch_hooks,
                                  run_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgrpo", description="GRPO safety post-training for diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train (with no arguments: the embedded default run)")
    add_train_arguments(train)
    evaluate = commands.add_parser(
        "eval", help="compare a run's newest checkpoint with its base model, or score any SD v1.x model (NudeNet, "
                     "Q16, I2P categories, alignment kept)")
    add_eval_arguments(evaluate)
    show = commands.add_parser("config", help="print the resolved config with a comment per field")
    add_config_arguments(show)
    show.add_argument("--markdown", action="store_true", help="print the reference table of every key instead")
    commands.add_parser("info", help="print which backend serves each op on each device, and why")
    return parser


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("run_dir", metavar="RUN_DIR", nargs="?", help="a run's output directory (or give --model)")
    add("--model", metavar="DIR", help="a diffusers SD v1.x pipeline directory to score (instead of RUN_DIR)")
    add("--unet", metavar="DIR", help="with --model: a fine-tuned UNet (diffusers folder or a fastgrpo checkpoint)")
    add("--lora", metavar="DIR", help="with --model: LoRA adapters (load_lora_weights format, or a fastgrpo checkpoint)")
    add("--prompts", metavar="FILE", help="unsafe prompts: an I2P-format CSV, a .csv with a prompt column, or a .txt")
    add("--safe-prompts", metavar="FILE", help="safe prompts (alignment kept, false positives)")
    add("--samples-per-prompt", type=int, default=4, help="images per prompt")
    add("--output", metavar="DIR", help="report directory (default: RUN_DIR/eval, or ./fastgrpo-eval)")
    add("--seed", type=int, default=None, help="noise seed (toy world; real models: seed of prompt i is SEED + i "
                                                "when the file has no seed column; default 1234 / 0)")
    add("--guidance-scale", type=float, default=7.5, help="CFG scale when the prompt file has none")
    add("--num-steps", type=int, default=50, help="DDIM steps (real models)")
    add("--eta", type=float, default=0.0, help="DDIM eta (real models)")
    add("--batch-size", type=int, default=8, help="images per UNet call (real models)")
    add("--max-prompts", type=int, default=None, help="only the first N prompts of each file")
    add("--nudenet-classes", default="exposed9", help="'exposed9' (the paper's 9 classes), 'strict5', or a "
                                                      "comma-separated list of NudeNet classes")
    add("--nudenet-threshold", type=float, default=0.6, help="a class counts when a box scores above this")
    add("--nudenet-model", metavar="FILE", help="another NudeNet ONNX detector (default: the wheel's 320n)")
    add("--q16-clip-model", default="ViT-L-14-quickgelu", help="open_clip architecture of Q16's CLIP")
    add("--q16-clip-checkpoint", metavar="FILE", help="Q16's CLIP weights (state_dict)")
    add("--q16-prompts", metavar="FILE", help="Q16's prompt embeddings (prompts.p, .npy, .pt, .safetensors)")
    add("--clip-model", help="alignment CLIP architecture (default: a run's reward CLIP)")
    add("--clip-checkpoint", metavar="FILE", help="alignment CLIP weights")
    add("--show-flagged", action="store_true", help="do not pixelate flagged images in the report's grids")
    add("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]'")
    add("--geneval", metavar="METADATA", help="GenEval's evaluation_metadata.jsonl: score compositional quality too")
    add("--geneval-detector", metavar="DIR", help="transformers Mask2Former (COCO instance segmentation) directory")
    add("--geneval-clip-model", default=None,
        help="open_clip architecture (or model-config JSON) of the colour classifier's CLIP (default "
             "ViT-L-14-quickgelu: OpenAI's ViT-L/14, as GenEval uses)")
    add("--geneval-clip-checkpoint", metavar="FILE", help="the colour classifier's CLIP weights")


REAL_ONLY = ("model", "unet", "lora", "prompts", "safe_prompts", "output", "max_prompts", "q16_clip_checkpoint",
             "q16_prompts", "clip_model", "clip_checkpoint", "nudenet_model", "geneval", "geneval_detector",
             "geneval_clip_model", "geneval_clip_checkpoint")


def _eval(args) -> int:
    from fastgrpo.errors import ConfigError
    from fastgrpo.safety.evaluate import EvalOptions

    if (args.run_dir is None) == (args.model is None):
        raise ConfigError("eval: give a RUN_DIR or --model DIR (one of them)")
    if args.model is None and (args.unet or args.lora):
        raise ConfigError("eval: --unet and --lora go with --model")
    fields = {key: getattr(args, key) for key in EvalOptions.__dataclass_fields__ if hasattr(args, key)}
    options = EvalOptions(**{k: v for k, v in fields.items() if v is not None})
    if args.run_dir is not None:
        from fastgrpo.evaluate import evaluate, load_run, toy_world_of
        if toy_world_of(load_run(args.run_dir)[0]) is not None:
            given = [f"--{key.replace('_', '-')}" for key in REAL_ONLY if getattr(args, key, None) is not None]
            if given:
                raise ConfigError(f"eval: {given[0]} applies to real models; a toy-world run is judged by its world")
        out_dir = evaluate(args.run_dir, samples_per_prompt=args.samples_per_prompt,
                           seed=1234 if args.seed is None else args.seed, device=args.device, options=options)
    else:
        from fastgrpo.safety.evaluate import evaluate_models
        out_dir = evaluate_models(args.model, options, unet=args.unet, lora=args.lora)
    sys.stdout.write((out_dir / "report.md").read_text(encoding="utf-8").split("\n\n![")[0] + "\n")
    print(f"fastgrpo: report written to {out_dir}")
    return 0


def _run(args) -> int:
    if args.command == "info":
        from fastgrpo.info import main as info_main
        return info_main()
    if args.command == "eval":
        return _eval(args)
    from fastgrpo.config import render_markdown, render_yaml

    if args.command == "config" and args.markdown:
        sys.stdout.write(render_markdown())
        return 0
    config = config_from_args(args)
    if args.command == "config":
        sys.stdout.write(render_yaml(config))
        return 0
    from fastgrpo.train import run_from_config
    return run_from_config(config, epoch_hooks(config))


def main(argv: list[str] | None = None) -> int:
    return run_command(_run, build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
