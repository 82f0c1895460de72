"""The `megaloop` command: parse, call one function per subcommand, print. No logic lives here.

Each handler imports its room inside itself: the rooms bring torch, DeepSpeed and MLflow
(importing the trainer takes about 6 s, this module 0.07 s), which `--help`, `--version`, a
refused argument and the other subcommands need not wait for.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import sys
import traceback
from typing import Any, NoReturn

from megaloop.errors import ConfigError, MegaloopError
from megaloop.process_exit import exit_process


def whole(least: int):
    """An argparse type: a whole number >= `least` (argparse then names the option)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below {least}: give {least} or more")
        return value

    return parse


def finite(text: str) -> float:
    """An argparse type: a finite number (no nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


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
    train.add_argument("--vocab-size", type=whole(2), required=True, help="number of pieces")
    train.add_argument("--out", required=True, help="the .model file to write")
    train.add_argument("--text-field", default="text",
                       help="field or column that holds the text (default: text)")
    train.add_argument("--max-sentences", type=whole(1), default=DEFAULT_MAX_SENTENCES,
                       help=f"lines sampled for training (default: {DEFAULT_MAX_SENTENCES})")
    train.add_argument("--seed", type=int, default=0, help="seed of the line sample")
    train.add_argument("--threads", type=whole(1), default=2, help="trainer threads (default: 2)")
    train.set_defaults(func=cmd_tokenizer_train)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from megaloop.data.corpus import open_corpus
    from megaloop.data.shards import prepare
    from megaloop.data.tokenizer import Tokenizer

    manifest = prepare(open_corpus(args.corpus, args.text_field), Tokenizer.load(args.tokenizer),
                       args.out, val_fraction=args.val_fraction, workers=args.workers,
                       part_tokens=args.part_tokens, packing=args.packing, seq_len=args.seq_len,
                       pack_buffer=args.pack_buffer, val_files=args.val_files)
    splits = manifest["splits"]
    print(f"shards in {args.out}: " + ", ".join(
        f"{name} {info['tokens']:,} tokens / {info['documents']:,} documents"
        + (f" in {info['rows']:,} rows ({info['tokens_cropped']:,} tokens cropped, "
           f"{info['tokens_left_over']:,} left over)" if "rows" in info else "")
        for name, info in splits.items()) + f" ({manifest['dtype']})")
    if manifest.get("val_files"):
        print(f"validation: every document of {', '.join(manifest['val_files'])}; training: the "
              f"other {manifest['corpus']['n_files'] - len(manifest['val_files'])} files")
    if not splits["val"]["documents"]:
        print(f"megaloop: warning: no document went to validation (--val-fraction "
              f"{args.val_fraction} of {splits['train']['documents']:,} documents): training "
              "refuses these shards. Prepare them again with a larger --val-fraction, or from "
              "more documents.", file=sys.stderr)
    return 0


def _add_data_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from megaloop.data.packing import DEFAULT_BUFFER_DOCUMENTS, PACKINGS
    from megaloop.data.shards import DEFAULT_PART_TOKENS
    from megaloop.data.tokenizer import DEFAULT_TOKENIZER

    data = sub.add_parser("data", parents=[common], help="prepare token shards")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = actions.add_parser("prepare", parents=[common],
                              help="encode a corpus into uint16/uint32 token shards")
    prep.add_argument("--corpus", required=True, help="as for `megaloop tokenizer train`")
    prep.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER),
                      help="sentencepiece model (default: the shipped stdlib-4k)")
    prep.add_argument("--out", required=True, help="folder for the shards and manifest")
    prep.add_argument("--val-fraction", type=finite, default=0.01,
                      help="share of documents held out for validation (default: 0.01)")
    prep.add_argument("--val-files", default="", metavar="NAME[,NAME...]",
                      help="files of the corpus folder whose documents are the validation split "
                           "(instead of --val-fraction; the iso-depth paper's: see configs/data/)")
    prep.add_argument("--workers", type=whole(1), default=2, help="encoding processes (default: 2)")
    prep.add_argument("--text-field", default="text", help="field or column holding the text")
    prep.add_argument("--part-tokens", type=whole(1), default=DEFAULT_PART_TOKENS,
                      help="training tokens per shard file")
    prep.add_argument("--packing", choices=PACKINGS, default="stream",
                      help="stream: documents followed by EOS, one stream (default); "
                           "bos_best_fit: BOS + document, best-fit packed into rows of "
                           "--seq-len + 1 tokens (the iso-depth paper's)")
    prep.add_argument("--seq-len", type=whole(1), metavar="T",
                      help="bos_best_fit: the model.max_seq_len the rows are for")
    prep.add_argument("--pack-buffer", type=whole(1), metavar="N",
                      help="bos_best_fit: documents the packer chooses from "
                           f"(default: {DEFAULT_BUFFER_DOCUMENTS})")
    prep.set_defaults(func=cmd_data_prepare)


def cmd_train(args: argparse.Namespace) -> int:
    from megaloop import config
    from megaloop.train.trainer import train

    run = config.load(args.config, args.overrides)
    if (args.accept_changes or args.trust_checkpoint) and not args.resume:
        raise MegaloopError("--accept-changes and --trust-checkpoint apply to a resume: add "
                            "--resume auto (or --resume DIR).")
    train(run, resume=args.resume, progress=not args.no_progress, peak=args.peak_flops,
          summary_json=args.json, accept_changes=args.accept_changes,
          trust_checkpoint=args.trust_checkpoint)
    return 0


def cmd_ds_config(args: argparse.Namespace) -> int:
    from megaloop import config
    from megaloop.train.ds_config import render_on_this_machine

    rendered = render_on_this_machine(config.load(args.config, args.overrides), args.world_size)
    print(json.dumps(rendered, indent=2))
    return 0


def _add_train_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    train = sub.add_parser("train", parents=[common],
                           help="train one run (use launch.sh for several ranks)")
    _add_config_arguments(train)
    train.add_argument("--resume", metavar="auto|DIR",
                       help="continue from the newest complete checkpoint (auto) or from DIR")
    train.add_argument("--accept-changes", action="store_true",
                       help="with --resume: continue the run with this config's other steps, "
                            "lrs or r, or on another number of ranks (recorded in the run "
                            "folder and in MLflow)")
    train.add_argument("--trust-checkpoint", action="store_true",
                       help="with --resume: load a checkpoint megaloop cannot verify (an older "
                            "marker, another tool's files) and unpickle it fully")
    train.add_argument("--peak-flops", type=finite,
                       help="peak FLOP/s of one device for MFU (default: known GPU or measured)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--json", metavar="FILE",
                       help="write the run's summary here (final val/loss, tokens/s and MFU per "
                            "log interval), also with track.enabled=false")
    train.set_defaults(func=cmd_train)

    ds_config = sub.add_parser("ds-config", parents=[common],
                               help="print the DeepSpeed config a run would use")
    _add_config_arguments(ds_config)
    ds_config.add_argument("--world-size", type=whole(1), default=1,
                           help="number of ranks to render for (default: 1)")
    ds_config.set_defaults(func=cmd_ds_config)


def cmd_sweep(args: argparse.Namespace) -> int:
    from megaloop.sweep.command import sweep

    report = sweep(args.spec, dry_run=args.dry_run, as_json=args.json, executor=args.executor,
                   nproc=args.nproc, jobs=args.jobs, progress=not args.no_progress,
                   slurm_options={"gpus_per_node": args.gpus_per_node,
                                  "cpus_per_task": args.cpus_per_task, "time": args.time,
                                  "partition": args.partition, "account": args.account,
                                  "extra": args.sbatch},
                   fit=args.fit, fit_restarts=args.fit_restarts,
                   fit_bootstrap=args.fit_bootstrap, argv=args.argv)
    for text in report.printed:
        print(text)
    return report.code


def _add_sweep_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    sweep = sub.add_parser("sweep", parents=[common], help="plan and run a sweep spec")
    sweep.add_argument("spec", help="sweep spec YAML (see configs/sweeps/)")
    sweep.add_argument("--dry-run", action="store_true",
                       help="print the plan (and the SLURM script) without training")
    sweep.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    sweep.add_argument("--executor", choices=["inprocess", "local", "slurm"], default="inprocess",
                       help="one process, launch.sh with --nproc ranks, or a SLURM array")
    sweep.add_argument("--nproc", type=whole(1), default=1, help="ranks per run (local, slurm)")
    sweep.add_argument("--jobs", type=whole(1), default=1,
                       help="runs trained at once, each in its own worker process on cores/jobs "
                            "threads (CPU, in-process executor)")
    slurm = sweep.add_argument_group("slurm", "what each array task asks for (over the spec's "
                                              "slurm: mapping)")
    slurm.add_argument("--gpus-per-node", type=whole(0),
                       help="GPUs per task (default: one per rank; 0: CPU ranks on purpose)")
    slurm.add_argument("--cpus-per-task", type=whole(1), help="CPUs per task")
    slurm.add_argument("--time", help="time limit, e.g. 24:00:00 (the task requeues at it)")
    slurm.add_argument("--partition", help="partition")
    slurm.add_argument("--account", help="account")
    slurm.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                       help="another #SBATCH option, e.g. --sbatch=--qos=high (repeatable)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    sweep.add_argument("--fit", action="store_true",
                       help="fit the scaling law on the experiment when the runs are done")
    sweep.add_argument("--fit-restarts", type=whole(1), default=500, help="starts of the fit")
    sweep.add_argument("--fit-bootstrap", type=whole(0), default=200, help="bootstrap resamples")
    sweep.set_defaults(func=cmd_sweep)


def cmd_eval(args: argparse.Namespace) -> int:
    from megaloop.infer.evaluate import evaluate_checkpoint, format_eval

    summary = evaluate_checkpoint(args.checkpoint, text=args.text, shards=args.shards,
                                  recurrences=args.recurrences, batch_size=args.batch_size,
                                  max_batches=args.max_batches, tokenizer=args.tokenizer,
                                  device=args.device, progress=not args.json)
    print(json.dumps(summary, indent=2) if args.json else format_eval(summary))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from megaloop.infer.generate import Sampling, generate_text

    if (args.early_exit is None) != (args.exit_threshold is None):
        raise ConfigError("--early-exit and --exit-threshold go together: name the criterion "
                          "(latent or kl) and the threshold, e.g. --early-exit latent "
                          "--exit-threshold 0.1.")
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, seed=args.seed, recurrences=args.recurrences,
                        stop_at_eos=not args.no_stop, kv_budget=args.kv_budget,
                        early_exit=args.early_exit, exit_threshold=args.exit_threshold or 0.0)
    result = generate_text(args.checkpoint, args.prompt, sampling, tokenizer=args.tokenizer,
                           device=args.device, use_cache=not args.no_cache)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(result["prompt"] + result["text"])
        print(f"megaloop: {len(result['tokens'])} tokens at {result['tokens_per_s']:.1f} "
              f"tokens/s (r = {result['recurrences']}, cache {'on' if result['cache'] else 'off'}"
              + (f", {result['recurrences_per_token']:.2f} recurrences per token"
                 if "recurrences_per_token" in result else "") + ")", file=sys.stderr)
    return 0


def _add_infer_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    checkpoint_help = ("a checkpoint folder (step_*), a run folder (its newest complete "
                       "checkpoint) or a .safetensors file made by `megaloop export`")
    evaluate = sub.add_parser("eval", parents=[common],
                              help="loss (nats/token) and bits per byte of a checkpoint")
    evaluate.add_argument("--checkpoint", required=True, help=checkpoint_help)
    data = evaluate.add_mutually_exclusive_group(required=True)
    data.add_argument("--text", metavar="FILE", help="a UTF-8 text file, read as one document")
    data.add_argument("--shards", metavar="DIR",
                      help="prepared token shards: the trainer's validation batches of their "
                           "val split")
    evaluate.add_argument("--recurrences", metavar="R[,R...]",
                          help="loop counts to evaluate at (default: the trained r)")
    evaluate.add_argument("--batch-size", type=whole(1),
                          help="sequences per batch (default: the run's train.micro_batch)")
    evaluate.add_argument("--max-batches", type=whole(1),
                          help="--shards: batches (default: the run's train.eval_batches x its "
                               "ranks, which reproduces its last val/loss)")
    evaluate.add_argument("--tokenizer", help="--text: sentencepiece model (default: the run's)")
    evaluate.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", parents=[common], help="sample text from a checkpoint")
    gen.add_argument("--checkpoint", required=True, help=checkpoint_help)
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=whole(1), default=64, help="(default: 64)")
    gen.add_argument("--temperature", type=finite, default=1.0, help="0 is greedy (default: 1)")
    gen.add_argument("--top-k", type=whole(1), help="sample among the k likeliest tokens")
    gen.add_argument("--recurrences", type=whole(1), help="loop count (default: the trained r)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampler (default: 0)")
    gen.add_argument("--no-cache", action="store_true",
                     help="recompute the whole sequence for every token (no KV cache)")
    gen.add_argument("--no-stop", action="store_true", help="do not stop at end-of-sequence")
    gen.add_argument("--kv-budget", type=whole(1),
                     help="keep the keys of the last K recurrences only (default: all)")
    gen.add_argument("--early-exit", choices=["latent", "kl"],
                     help="stop a token's recurrences once its state (latent) or next-token "
                          "distribution (kl) changes by less than --exit-threshold")
    gen.add_argument("--exit-threshold", type=finite,
                     help="with --early-exit: the relative state change (latent) or KL in nats "
                          "(kl) below which a token stops, e.g. 0.1 or 1e-3")
    gen.add_argument("--tokenizer", help="sentencepiece model (default: the run's)")
    gen.add_argument("--device", help="cpu, cuda, ... (default: cuda if present)")
    gen.add_argument("--json", action="store_true", help="print JSON (ids, speed) instead")
    gen.set_defaults(func=cmd_generate)


def cmd_export(args: argparse.Namespace) -> int:
    from megaloop.atomic import check_output
    from megaloop.export.weights import export_safetensors

    check_output(args.out, "--out", folder=False)
    result = export_safetensors(args.checkpoint, args.out)
    print(f"exported {result['parameters']:,} fp32 parameters of {result['checkpoint']} to "
          f"{result['out']}")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from megaloop.atomic import check_output
    from megaloop.export.hf import export_hf

    check_output(args.out, "--out", folder=True)
    result = export_hf(args.checkpoint, args.out, tokenizer_path=args.tokenizer,
                       format=args.format)
    print(f"exported {result['checkpoint']} as {result['architecture']} ({result['layers']} "
          f"layers deep) with its tokenizer to {result['out']}")
    if result["architecture"] == "MegaloopForCausalLM":
        print("load it with AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True); "
              "recurrences=R chooses the depth")
    return 0


def _add_export_parsers(sub: argparse._SubParsersAction,
                        common: argparse.ArgumentParser) -> None:
    export = sub.add_parser("export", parents=[common],
                            help="consolidated fp32 weights + config as one .safetensors file")
    export.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder (step_*) or a run folder")
    export.add_argument("--out", required=True, help="the .safetensors file to write")
    export.set_defaults(func=cmd_export)
    hf = sub.add_parser("export-hf", parents=[common],
                        help="a Hugging Face transformers folder with the tokenizer "
                             "(LlamaForCausalLM or MegaloopForCausalLM)")
    hf.add_argument("--checkpoint", required=True,
                    help="a checkpoint folder, run folder or megaloop .safetensors file")
    hf.add_argument("--out", required=True, help="the folder to write")
    hf.add_argument("--tokenizer", help="sentencepiece model (default: the run's)")
    hf.add_argument("--format", choices=["auto", "llama", "megaloop"], default="auto",
                    help="llama: LlamaForCausalLM (r = 1 or a passthrough loop, unrolled); "
                         "megaloop: MegaloopForCausalLM with its modeling code, any variant, r "
                         "chosen at run time; auto (default): llama where Llama can express "
                         "the model, else megaloop")
    hf.set_defaults(func=cmd_export_hf)


def cmd_runs(args: argparse.Namespace) -> int:
    from megaloop.track.browse import format_runs, list_runs, store_uri
    from megaloop.track.relocate import relocate_artifacts, stale_locations

    uri = store_uri(args.tracking_uri)
    if args.relocate:
        changed = relocate_artifacts(uri)
        print(f"megaloop: {changed} artifact location(s) of {uri} now point beside it",
              file=sys.stderr)
    rows = list_runs(args.experiment, uri)
    print(json.dumps(rows, indent=2) if args.json else format_runs(rows))
    stale = stale_locations(uri)
    if stale:
        print(f"megaloop: warning: {stale} experiment(s) of {uri} keep their artifacts in "
              "another copy of this store (a copied or moved folder); `megaloop runs "
              "--relocate` points them at the artifacts beside it.", file=sys.stderr)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from megaloop.track.browse import serve_ui

    return serve_ui(args.port, args.tracking_uri, announce=lambda line: print(line, flush=True))


def _add_browse_parsers(sub: argparse._SubParsersAction,
                        common: argparse.ArgumentParser) -> None:
    from megaloop.track.browse import DEFAULT_UI_PORT

    store_help = "MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)"
    runs = sub.add_parser("runs", parents=[common], help="a table of the tracked runs")
    runs.add_argument("--experiment", help="one experiment (default: all)")
    runs.add_argument("--tracking-uri", help=store_help)
    runs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    runs.add_argument("--relocate", action="store_true",
                      help="first point a copied or moved sqlite store's artifact locations "
                           "at the artifacts folder beside it")
    runs.set_defaults(func=cmd_runs)
    ui = sub.add_parser("ui", parents=[common], help="MLflow's UI over the project's store")
    ui.add_argument("--port", type=whole(1), default=DEFAULT_UI_PORT,
                    help=f"port on 127.0.0.1 (default: {DEFAULT_UI_PORT})")
    ui.add_argument("--tracking-uri", help=store_help)
    ui.set_defaults(func=cmd_ui)


def cmd_fit(args: argparse.Namespace) -> int:
    from megaloop.atomic import check_output
    from megaloop.fit.command import run_fit
    from megaloop.fit.report import format_summary

    if args.report:
        check_output(args.report, "--report", folder=True)
    if args.json:
        check_output(args.json, "--json", folder=False)
    if args.against is not None:
        if args.fix_phi is not None or args.report:
            raise ConfigError("--against compares free phis: drop --fix-phi and --report.")
        from megaloop.fit.command import run_compare

        compared = run_compare(against=args.against, runs_csv=args.runs,
                               experiment=args.experiment, filters=args.filters,
                               tracking=args.tracking_uri, restarts=args.restarts,
                               bootstrap=args.bootstrap, seed=args.seed, json_out=args.json,
                               log_to_mlflow=not args.no_log)
        print(f"phi({compared['a']}) = {compared['phi_a']:.4f}, phi({compared['b']}) = "
              f"{compared['phi_b']:.4f}")
        print(compared["verdict"])
        if compared.get("mlflow_run_id"):
            print(f"logged as MLflow run {compared['mlflow_run_id']}")
        return 0
    _, summary = run_fit(runs_csv=args.runs, experiment=args.experiment, filters=args.filters,
                         tracking=args.tracking_uri, fix_phi=args.fix_phi,
                         restarts=args.restarts, bootstrap=args.bootstrap, seed=args.seed,
                         json_out=args.json, report_dir=args.report,
                         log_to_mlflow=not args.no_log)
    print(format_summary(summary))
    if summary.get("report"):
        print(f"report: {summary['report']}")
    return 0


def _add_fit_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    fit = sub.add_parser("fit", parents=[common],
                         help="fit the looped scaling law (phi) with bootstrap intervals")
    source = fit.add_mutually_exclusive_group(required=True)
    source.add_argument("--runs", metavar="FILE.csv",
                        help="CSV with n_once, n_rec, recurrences, tokens, loss [, budget_flops]")
    source.add_argument("--experiment", metavar="NAME",
                        help="the finished runs of an MLflow experiment (val/loss)")
    fit.add_argument("--filter", dest="filters", action="append", default=[],
                     metavar="TAG=VALUE", help="only MLflow runs with this tag (repeatable)")
    fit.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else "
                                            "sqlite:///runs/mlflow.db)")
    fit.add_argument("--fix-phi", type=finite, metavar="X",
                     help="fit with phi fixed at X (e.g. 0 or 1) instead of free")
    fit.add_argument("--restarts", type=whole(1), default=500,
                     help="random starts in the paper's box (default: 500)")
    fit.add_argument("--bootstrap", type=whole(0), default=200,
                     help="bootstrap resamples for the intervals (default: 200; 0: none)")
    fit.add_argument("--seed", type=int, default=0, help="seed of starts and resamples")
    fit.add_argument("--json", metavar="OUT", help="write the fit as JSON to OUT")
    fit.add_argument("--report", metavar="DIR",
                     help="write a Markdown report with PNG plots to DIR")
    fit.add_argument("--no-log", action="store_true",
                     help="with --experiment: do not log the fit as an MLflow run")
    fit.add_argument("--against", metavar="A",
                     help="fit A too and report phi - phi(A) with its bootstrap interval (A: a "
                          "CSV with --runs, an experiment with --experiment)")
    fit.set_defaults(func=cmd_fit)


class _PrintVersion(argparse.Action):
    """`--version`: the version and source commit, looked up only when asked (git runs)."""

    def __init__(self, option_strings: list[str], dest: str, **_: Any):
        super().__init__(option_strings, dest, nargs=0,
                         help="print megaloop's version and the commit it runs from, then exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from megaloop.version import describe

        print(describe())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megaloop", description="Train looped language models and fit how much a recurrence "
                                     "is worth.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--version", action=_PrintVersion)
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
    _add_infer_parsers(sub, common)
    _add_export_parsers(sub, common)
    _add_browse_parsers(sub, common)
    _add_fit_parser(sub, common)
    return parser


def explain_os_error(exc: OSError) -> str:
    """What went wrong with which path, and the fix, for an error the file system raised."""

    from megaloop.atomic import file_in_the_way

    name = exc.filename or "a file"
    as_folder = exc.errno in (errno.EEXIST, errno.ENOTDIR)  # a folder was to be made there
    blocking = file_in_the_way(str(name), itself=as_folder)
    if blocking is not None:
        return (f"cannot write {name}: {blocking} is a file, not a folder. Choose a path "
                "whose folders are folders, or move that file away.")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write {name} ({exc.strerror}): choose a folder you can write, e.g. "
                "under your home or scratch space.")
    if exc.errno == errno.ENOSPC:
        return f"cannot write {name}: the disk is full. Free space, or choose another disk."
    if exc.errno == errno.EEXIST or exc.errno == errno.EISDIR:
        return (f"cannot write {name}: something else is at that path ({exc.strerror}). Choose "
                "a new path, or move it away.")
    return f"{name}: {exc.strerror or exc}. Check the path and try again."


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to say how to run it again
    try:
        return args.func(args)
    except MegaloopError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"megaloop: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path to write that cannot be: an --out, a report, a store
        if args.debug:
            traceback.print_exc()
        print(f"megaloop: error: {explain_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megaloop: interrupted", file=sys.stderr)
        return 130


def run() -> NoReturn:
    """The `megaloop` command: main's status, the process ended as process_exit.py says."""
    try:
        code = main()
    except SystemExit as exc:  # argparse's usage errors, --help
        if exc.code is not None and not isinstance(exc.code, int):
            raise
        code = exc.code
    except BaseException:  # a bug: its traceback, then the same ending
        traceback.print_exc()
        code = 1
    exit_process(code)


if __name__ == "__main__":
    run()
