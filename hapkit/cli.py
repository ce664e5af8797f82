"""Command line: ``hapkit train | evaluate | reproduce | prepare-data | recipes``.

Every command works out of the box on the embedded generated dataset, on a CPU:

    hapkit recipes                                  # what can be trained
    hapkit train --recipe happier --dataset generated --out runs/happier
    hapkit evaluate --checkpoint runs/happier/checkpoint.pt
    hapkit reproduce                                # HAPPIER vs SupAP vs Smooth-AP vs HPL table
    hapkit reproduce --notebooks                    # the grid, then every notebook reading its runs

``python -m hapkit`` is the same program.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

EPILOG = "Run `hapkit <command> --help` for the options of one command."


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a recipe",
        description=(
            "Train an embedding model from a recipe (a bundled recipe, see `hapkit recipes`, or a "
            "YAML file). The run directory receives config.yaml (the resolved recipe), run.json "
            "(this command: recipe, overrides, data root, seed, device, versions), metrics.jsonl "
            "(one line per epoch) and checkpoint.pt (verified, updated every epoch, the previous "
            "one kept). A directory that holds a run is never trained over: continue it with "
            "--resume (`hapkit train --out DIR --resume` restores every option of the run) or move "
            "it aside with --overwrite. "
            "Several GPUs: launch with `torchrun --nproc_per_node=N -m hapkit train ...`."
        ),
        epilog="example: hapkit train --recipe happier --dataset generated --set train.epochs=5",
    )
    p.add_argument("--recipe", default=None,
                   help="recipe name (e.g. happier_sop), a method with --dataset (e.g. happier), or a YAML path; "
                        "optional with --resume (the run directory records it)")
    p.add_argument("--dataset", default=None, help="dataset to pair with a method name (generated, sop, inat_base, ...)")
    p.add_argument("--data-root", default=None, help="folder holding the prepared dataset (see `hapkit prepare-data`)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<recipe>-seed<seed>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set optim.lr=1e-5 --set train.epochs=3 (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="random seed (same as --set seed=N)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out with the options it was started with (starts fresh if there is "
                        "none); --set may change only what continuing allows (more epochs, device, workers, eval)")
    p.add_argument("--overwrite", action="store_true",
                   help="train from scratch even if --out holds a run: the old run is moved to <out>.replaced-<time>")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a trained checkpoint",
        description=(
            "Embed the eval sets of the checkpoint's dataset with its model and print every "
            "retrieval metric (H-AP, ASI, NDCG, AP, mAP@R, R@k per level). Under "
            "`torchrun --nproc_per_node N -m hapkit evaluate ...` each process embeds its share "
            "of every set on its own GPU and they rank together."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `hapkit train`")
    p.add_argument("--data-root", default=None, help="dataset folder, if not the one used for training")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_reproduce(sub) -> None:
    p = sub.add_parser(
        "reproduce",
        help="run the training notebook over methods x datasets x seeds and tabulate the results",
        description=(
            "Execute notebooks/03_training.ipynb with papermill once per (method, dataset, seed), "
            "each run in its own directory under OUT/runs (runs that already finished are skipped), "
            "then write OUT/summary.csv and OUT/summary.md (mean +/- std over seeds of R@1, AP per "
            "level, H-AP, ASI and NDCG, beside the published numbers) and OUT/runs.csv (every metric "
            "of every run). The default grid (HAPPIER, SupAP, Smooth-AP, HPL, SupRank's SupRecall and "
            "SupNDCG on the generated dataset, one seed) takes a few minutes on two CPU cores (use --jobs 2)."
        ),
        epilog="example: hapkit reproduce --methods happier supap --datasets sop --data-root data/sop --seeds 3",
    )
    p.add_argument("--methods", nargs="+", default=None, help="methods (default: happier supap smoothap hpl suprecall supndcg)")
    p.add_argument("--datasets", nargs="+", default=None, help="datasets (default: generated)")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds per (method, dataset), 0..N-1 (default 1)")
    p.add_argument("--data-root", default=None, help="dataset folder passed to every run")
    p.add_argument("--out", default="results", help="results folder (default: results)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs executed in parallel, each with its share of the CPU threads (default 1)")
    p.add_argument("--epochs", type=int, default=None, help="override every recipe's number of epochs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override passed to every run (repeatable)")
    p.add_argument("--force", action="store_true", help="re-run runs that already finished")
    p.add_argument("--notebooks", action="store_true",
                   help="after the grid, execute every notebook in notebooks/ into OUT/notebooks; they read the grid's runs")
    p.add_argument("--notebook", default=None, help="training notebook to run (default: notebooks/03_training.ipynb)")
    p.add_argument("--timeout", type=int, default=None, help="seconds a notebook cell may run (default: no limit)")


def _add_prepare(sub) -> None:
    # a plain table: every command builds this parser, so it must not import the loaders (or torch)
    from hapkit.data.registry import dataset_names

    names = ", ".join(dataset_names())
    p = sub.add_parser(
        "prepare-data",
        help="download, verify and lay out a dataset",
        description=(
            f"Prepare dataset NAME in ROOT ({names}): the generated dataset is built on the spot; "
            "real datasets are downloaded from their public locations and verified where that is "
            "possible, and the message says what to fetch by hand where it is not."
        ),
    )
    p.add_argument("name", choices=dataset_names(), metavar="NAME", help=f"one of: {names}")
    p.add_argument("--root", default=None, help="folder for the dataset")


def _add_recipes(sub) -> None:
    p = sub.add_parser(
        "recipes",
        help="list the bundled training recipes",
        description="List the bundled recipes (<method>_<dataset>) with a one-line description.",
    )
    p.add_argument("--method", default=None, help="only recipes of this method")
    p.add_argument("--dataset", default=None, help="only recipes for this dataset")
    p.add_argument("--show", default=None, metavar="NAME",
                   help="print one recipe, fully resolved (every field, its parameter groups and transforms), as YAML")
    p.add_argument("--json", action="store_true", help="with --show: print JSON instead of YAML")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hapkit",
        description=(
            "hapkit: hierarchical image retrieval (H-AP, HAPPIER, ROADMAP/SupRank, listwise AP, "
            "hierarchical proxy losses). Train, evaluate and reproduce results; everything runs on "
            "the embedded generated dataset without a GPU."
        ),
        epilog=EPILOG,
    )
    from hapkit import __version__

    parser.add_argument("--version", action="version", version=f"hapkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_train, _add_evaluate, _add_reproduce, _add_prepare, _add_recipes):
        add(sub)
    for command in sub.choices.values():  # --debug after the command too; SUPPRESS keeps the top-level value
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the full traceback of an error")
    return parser


# ------------------------------------------------------------------------------- commands


def _train_setup(args):
    """(recipe, run directory, invocation record) of a ``hapkit train`` command. With --resume the
    run directory's record is the base and the command's options change it where continuing allows
    (the engine refuses the rest, naming each difference)."""
    from hapkit.training.config import ConfigError, Recipe, apply_overrides, from_dict
    from hapkit.training.recipes import load_recipe
    from hapkit.training.rundir import claim_run_dir, holds_run, read_invocation, recorded_recipe

    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it: choose one")
    if args.recipe is None and args.out is None:
        raise ConfigError("--recipe is required (or --out DIR --resume to continue a run): "
                          "e.g. hapkit train --recipe happier_generated")
    fresh = load_recipe(args.recipe, args.dataset, overrides) if args.recipe is not None else None
    out = Path(args.out) if args.out is not None else Path("runs") / f"{fresh.name}-seed{fresh.seed}"
    recorded = recorded_recipe(out) if args.resume and holds_run(out) else None
    if recorded is not None:
        if fresh is not None and fresh.name != recorded.get("name"):
            raise ConfigError(
                f"--recipe {args.recipe} names {fresh.name}, but the run in {out} trains {recorded.get('name')}: "
                f"drop --recipe to resume it, or train {fresh.name} into another --out"
            )
        if args.data_root is not None:
            overrides.append(f"data.root={args.data_root}")
        cfg = apply_overrides(from_dict(Recipe, recorded), overrides)
        record = read_invocation(out) or {}
        return cfg, out, {k: record[k] for k in ("recipe_arg", "dataset", "overrides") if k in record}
    if fresh is None:
        raise ConfigError(f"--recipe is required ({out} holds no run to resume): e.g. hapkit train --recipe happier_generated")
    cfg = apply_overrides(fresh, [f"data.root={args.data_root}"]) if args.data_root is not None else fresh
    if not (args.overwrite or args.resume):
        claim_run_dir(out)  # refuse before the model and data are built
    return cfg, out, {"recipe_arg": args.recipe, "dataset": args.dataset, "overrides": overrides}


def _cmd_train(args) -> int:
    from hapkit.training.engine import Trainer
    from hapkit.training.rundir import resume_command

    cfg, out, invocation = _train_setup(args)
    trainer = Trainer(cfg, out_dir=out, progress=not args.no_progress, invocation=invocation)

    def stop(signum, frame):  # preemption (SLURM, spot instances): checkpoint and exit cleanly
        print(f"signal {signum}: checkpointing and stopping", file=sys.stderr)
        trainer.request_stop()

    for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
        if sig is not None:
            signal.signal(sig, stop)
    from hapkit.training.distributed import shutdown_distributed

    try:
        result = trainer.fit(resume=args.resume, overwrite=args.overwrite)
    finally:
        shutdown_distributed()
    if trainer.dist.is_main:
        for key, (before, after) in trainer.resumed_changes.items():
            print(f"resumed with {key}: {before!r} -> {after!r}")
        if result.interrupted:
            print(f"stopped at step {result.global_step}; resume with: "
                  f"{resume_command(result.run_dir, trainer.dist.world_size)}")
        _print_metrics(result.metrics)
        print(f"run directory: {result.run_dir}")
    return 0


def _print_metrics(metrics: dict) -> None:
    if not metrics:
        return
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        print(f"{k:<{width}}  {100 * v:7.2f}")


def _cmd_evaluate(args) -> int:
    """Evaluate a checkpoint; under ``torchrun --nproc_per_node N`` every process embeds its share
    of each eval set (on its own GPU) and they rank together; process 0 prints."""
    from hapkit.training.distributed import init_distributed, shutdown_distributed
    from hapkit.training.runs import evaluate_checkpoint

    ctx = init_distributed(args.device)
    try:
        metrics = evaluate_checkpoint(args.checkpoint, device=ctx.device, data_root=args.data_root,
                                      progress=not args.no_progress and ctx.is_main, distributed=ctx.enabled)
    finally:
        shutdown_distributed()
    if ctx.is_main:
        _print_metrics(metrics)
        if args.json:
            Path(args.json).write_text(json.dumps(metrics, indent=2))
    return 0


def _cmd_reproduce(args) -> int:
    from hapkit import reproduce
    from hapkit.results import format_markdown

    kwargs = dict(
        methods=args.methods, datasets=args.datasets, seeds=args.seeds, data_root=args.data_root,
        out=args.out, jobs=args.jobs, epochs=args.epochs, overrides=args.overrides, force=args.force,
        notebook=args.notebook, timeout=args.timeout,
    )
    try:
        if args.notebooks:
            summary = reproduce.reproduce_all(**kwargs)
        else:
            summary = reproduce.run_grid(**kwargs)
    except reproduce.DataNotPrepared as e:
        print(f"hapkit reproduce: {e}", file=sys.stderr)
        return 2
    print(format_markdown(summary))
    print(f"\nwritten: {Path(args.out) / 'summary.csv'} and {Path(args.out) / 'summary.md'}")
    return 0


def _cmd_prepare(args) -> int:
    from hapkit.data import DataError, prepare

    try:
        where = prepare(args.name, args.root)
    except DataError as e:  # manual download needed, checksum mismatch, ...: the message says what to do
        print(f"hapkit prepare-data: {e}", file=sys.stderr)
        return 2
    print(f"{args.name} is ready" + (f" in {where}" if where else ""))
    return 0


def _cmd_recipes(args) -> int:
    import yaml

    from hapkit.training.recipes import list_recipes, load_recipe, read_recipe_dict, resolved_recipe

    if args.show:
        shown = resolved_recipe(load_recipe(args.show))
        print(json.dumps(shown, indent=2) if args.json else yaml.safe_dump(shown, sort_keys=False), end="\n" if args.json else "")
        return 0
    rows = []
    for name in list_recipes():
        data = read_recipe_dict(name)
        method = data.get("method") or name.rsplit("_", 1)[0]
        dataset = data.get("data", {}).get("dataset", "")
        if args.method and method != args.method:
            continue
        if args.dataset and dataset != args.dataset:
            continue
        rows.append((name, data.get("description", "")))
    width = max((len(n) for n, _ in rows), default=0)
    for name, desc in rows:
        print(f"{name:<{width}}  {desc}")
    return 0


COMMANDS = {
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "reproduce": _cmd_reproduce,
    "prepare-data": _cmd_prepare,
    "recipes": _cmd_recipes,
}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from hapkit.errors import HapkitError

    try:
        return COMMANDS[args.command](args)
    except (HapkitError, FileNotFoundError) as e:
        # bad settings or input, missing data, checkpoints, extras or devices: the message says what to do
        if args.debug:
            raise
        print(f"hapkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
