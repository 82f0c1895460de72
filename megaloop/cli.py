"""The `megaloop` command: parse, call one function per subcommand, print. No logic lives here."""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from megaloop.errors import MegaloopError


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML run config (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")


def cmd_params(args: argparse.Namespace) -> int:
    from megaloop import config
    from megaloop.model.accounting import account, format_table

    run = config.load(args.config, args.overrides)
    result = account(run.model)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(run.model, result, title=args.config or "defaults"))
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from megaloop.data.corpus import open_corpus
    from megaloop.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(open_corpus(args.corpus, args.text_field), args.vocab_size,
                                args.out, max_sentences=args.max_sentences, seed=args.seed,
                                threads=args.threads)
    print(f"tokenizer {tokenizer.path}: vocab_size {tokenizer.vocab_size}, "
          f"sha256 {tokenizer.sha256}")
    return 0


def _add_tokenizer_parser(sub: argparse._SubParsersAction,
                          common: argparse.ArgumentParser) -> None:
    from megaloop.data.tokenizer import DEFAULT_MAX_SENTENCES

    tokenizer = sub.add_parser("tokenizer", parents=[common], help="train sentencepiece models")
    actions = tokenizer.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = actions.add_parser("train", parents=[common],
                               help="train a byte-fallback BPE model on a corpus")
    train.add_argument("--corpus", required=True,
                       help="`stdlib`, a file or folder (.txt/.jsonl/.jsonl.gz/.parquet), "
                            "hf:NAME[:CONFIG][?split=S] or hf:json:FILES")
    train.add_argument("--vocab-size", type=int, required=True, help="number of pieces")
    train.add_argument("--out", required=True, help="the .model file to write")
    train.add_argument("--text-field", default="text",
                       help="field or column that holds the text (default: text)")
    train.add_argument("--max-sentences", type=int, default=DEFAULT_MAX_SENTENCES,
                       help=f"lines sampled for training (default: {DEFAULT_MAX_SENTENCES})")
    train.add_argument("--seed", type=int, default=0, help="seed of the line sample")
    train.add_argument("--threads", type=int, default=2, help="trainer threads (default: 2)")
    train.set_defaults(func=cmd_tokenizer_train)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from megaloop.data.corpus import open_corpus
    from megaloop.data.shards import prepare
    from megaloop.data.tokenizer import Tokenizer

    manifest = prepare(open_corpus(args.corpus, args.text_field), Tokenizer.load(args.tokenizer),
                       args.out, val_fraction=args.val_fraction, workers=args.workers,
                       part_tokens=args.part_tokens)
    splits = manifest["splits"]
    print(f"shards in {args.out}: " + ", ".join(
        f"{name} {info['tokens']:,} tokens / {info['documents']:,} documents"
        for name, info in splits.items()) + f" ({manifest['dtype']})")
    return 0


def _add_data_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from megaloop.data.shards import DEFAULT_PART_TOKENS
    from megaloop.data.tokenizer import DEFAULT_TOKENIZER

    data = sub.add_parser("data", parents=[common], help="prepare token shards")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = actions.add_parser("prepare", parents=[common],
                              help="encode a corpus into uint16/uint32 token shards")
    prep.add_argument("--corpus", required=True, help="as for `megaloop tokenizer train`")
    prep.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER),
                      help="sentencepiece model (default: the repository's tokenizer/)")
    prep.add_argument("--out", required=True, help="folder for the shards and manifest")
    prep.add_argument("--val-fraction", type=float, default=0.01,
                      help="share of documents held out for validation (default: 0.01)")
    prep.add_argument("--workers", type=int, default=2, help="encoding processes (default: 2)")
    prep.add_argument("--text-field", default="text", help="field or column holding the text")
    prep.add_argument("--part-tokens", type=int, default=DEFAULT_PART_TOKENS,
                      help="training tokens per shard file")
    prep.set_defaults(func=cmd_data_prepare)


def cmd_train(args: argparse.Namespace) -> int:
    from megaloop import config
    from megaloop.train.trainer import train

    run = config.load(args.config, args.overrides)
    train(run, resume=args.resume, progress=not args.no_progress, peak=args.peak_flops)
    return 0


def cmd_ds_config(args: argparse.Namespace) -> int:
    from megaloop import config
    from megaloop.train.engine import render_ds_config

    run = config.load(args.config, args.overrides)
    print(json.dumps(render_ds_config(run, args.world_size), indent=2))
    return 0


def _add_train_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    train = sub.add_parser("train", parents=[common],
                           help="train one run (use launch.sh for several ranks)")
    _add_config_arguments(train)
    train.add_argument("--resume", metavar="auto|DIR",
                       help="continue from the newest complete checkpoint (auto) or from DIR")
    train.add_argument("--peak-flops", type=float,
                       help="peak FLOP/s of one device for MFU (default: known GPU or measured)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    ds_config = sub.add_parser("ds-config", parents=[common],
                               help="print the DeepSpeed config a run would use")
    _add_config_arguments(ds_config)
    ds_config.add_argument("--world-size", type=int, default=1,
                           help="number of ranks to render for (default: 1)")
    ds_config.set_defaults(func=cmd_ds_config)


def cmd_sweep(args: argparse.Namespace) -> int:
    from megaloop.sweep.execute import execute
    from megaloop.sweep.plan import plan, plan_rows, plan_table, read_spec
    from megaloop.train.mfu import peak_flops

    spec = read_spec(args.spec)
    runs = plan(spec)
    if args.dry_run and args.json:
        print(json.dumps(plan_rows(runs), indent=2))
    elif args.dry_run:
        peak, _ = peak_flops(None, runs[0].config.train.precision if runs else "fp32")
        print(plan_table(runs, peak, assumed_mfu=0.4))
    outcome = execute(runs, spec["experiment"], executor=args.executor, nproc=args.nproc,
                      dry_run=args.dry_run, progress=not args.no_progress)
    if outcome.script and args.dry_run:
        print(outcome.script)
    if not args.dry_run:
        print(f"sweep {outcome.experiment}: {outcome.planned} runs planned, "
              f"{len(outcome.skipped)} already finished, {len(outcome.trained)} trained")
    return 0


def _add_sweep_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    sweep = sub.add_parser("sweep", parents=[common], help="plan and run a sweep spec")
    sweep.add_argument("spec", help="sweep spec YAML (see configs/sweeps/)")
    sweep.add_argument("--dry-run", action="store_true",
                       help="print the plan (and the SLURM script) without training")
    sweep.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    sweep.add_argument("--executor", choices=["inprocess", "local", "slurm"], default="inprocess",
                       help="one process, launch.sh with --nproc ranks, or a SLURM array")
    sweep.add_argument("--nproc", type=int, default=1, help="ranks per run (local, slurm)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    sweep.set_defaults(func=cmd_sweep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megaloop", description="Train looped language models and fit how much a recurrence "
                                     "is worth.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks of errors")

    params = sub.add_parser("params", parents=[common],
                            help="parameter groups and training FLOPs per token")
    _add_config_arguments(params)
    params.add_argument("--json", action="store_true", help="print JSON instead of a table")
    params.set_defaults(func=cmd_params)
    _add_tokenizer_parser(sub, common)
    _add_data_parser(sub, common)
    _add_train_parsers(sub, common)
    _add_sweep_parser(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MegaloopError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"megaloop: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megaloop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
