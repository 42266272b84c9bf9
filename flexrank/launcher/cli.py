"""`flexrank` command line. Bad input ends with a one-line message naming the key (exit 2), never a traceback."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..shipped import find_recipe
from ..data.cache import CATEGORIES as CACHE_CATEGORIES
from ..errors import ConfigError
from ..io import refuse_foreign


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="YAML recipe file, or the name of a shipped recipe (e.g. analogy_elastic; "
                                             "default: the embedded SmolLM2 word-analogy run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set training.learning_rate=1e-4 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexrank", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune with a recipe; prints the task metric before and after")
    _add_recipe_args(p)
    p.add_argument("--nproc", type=int, help="processes per node (re-launches through accelerate launch)")
    p.add_argument("--nnodes", type=int, help="number of nodes")
    p.add_argument("--node-rank", type=int, help="this node's rank (multi-node)")
    p.add_argument("--main-process-ip", help="address of node 0 (multi-node)")
    p.add_argument("--main-process-port", type=int, help="rendezvous port")
    p.add_argument("--backend", help="single | ddp | fsdp2 | zero2 | zero3 | zero3_offload | an accelerate YAML")
    p.add_argument("--resume", help="auto (newest complete checkpoint in output_dir) or a checkpoint folder")
    p = sub.add_parser("check", help="validate a recipe and print it resolved, without running")
    _add_recipe_args(p)
    p = sub.add_parser("prepare", help="convert the bundled model and fetch the bundled data sets into the cache, "
                                       "or download a hub model into the HF cache (for offline clusters)")
    p.add_argument("--model", metavar="ORG/NAME", help="a hub model id to download (instead of the bundled assets)")
    p.add_argument("--revision", help="branch, tag or commit of --model (default: main)")
    p = sub.add_parser("export", help="write a run's (sub)network as a plain peft LoRA adapter "
                                       "(nncf runs: the INT4 model, into OUT/model.safetensors)")
    p.add_argument("run_dir")
    p.add_argument("--subnet", default="heuristic",
                   help="maximal | heuristic | minimal | a JSON {group: width} (elastic runs; AdaLoRA and SoRA "
                        "runs export the ranks they learned)")
    p.add_argument("--out", help="output folder of the plain adapter")
    p.add_argument("--compact", metavar="DIR", help="also (or only) write a physically smaller HF model: the base "
                                                    "sliced to the subnet's base widths, the adapter merged")
    p.add_argument("--keep-adapter", action="store_true",
                   help="with --compact: write the subnet's adapter as a plain peft adapter in DIR/adapter "
                        "instead of merging it")
    p.add_argument("--merge-sparse", metavar="DIR",
                   help="also write the base with the adapter merged, keeping the base's zeros (Shears/SparsePEFT)")
    p = sub.add_parser("eval", help="evaluate a finished run's adapter (elastic: one or more subnets)")
    p.add_argument("run_dir")
    p.add_argument("--subnet", action="append", help="subnet(s) to evaluate (elastic runs)")
    _add_slurm_parser(sub)
    p = sub.add_parser("search", help="NSGA-II search over an elastic run's subnets (metric vs cost), into RUN_DIR/search")
    p.add_argument("run_dir")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="search.KEY=VALUE",
                   help="override a search setting, e.g. --set search.num_evals=200 (repeatable)")
    p.add_argument("--nproc", type=int, help="processes splitting the subnets (re-launches through accelerate, DDP)")
    p = sub.add_parser("cache", help="list the flexrank cache ($FLEXRANK_CACHE) by category and entry, or clear it "
                       "(entries in use by a running job are kept)")
    p.add_argument("--category", choices=CACHE_CATEGORIES, help="only this category")
    p.add_argument("--older-than", metavar="AGE", help="only entries last used longer ago than AGE (7d, 12h, 30m)")
    p.add_argument("--entries", action="store_true", help="list every entry: size, last use, whether in use")
    p.add_argument("--clear", action="store_true", help="delete the selected entries")
    return parser


def _add_slurm_parser(sub) -> None:
    slurm = sub.add_parser("slurm", help="SLURM job array sweeps (slurm/sweep.sbatch): write/submit, collect")
    ssub = slurm.add_subparsers(dest="slurm_command", required=True)
    p = ssub.add_parser("sweep", help="write SWEEP_DIR/sweep.txt (a grid of --set overrides) and print or submit "
                                      "the job array")
    p.add_argument("recipe")
    p.add_argument("--set-grid", action="append", required=True, metavar="KEY=V1,V2",
                   help="one axis of the grid, e.g. training.learning_rate=1e-4,3e-4 (repeatable)")
    p.add_argument("--out", required=True, help="the sweep folder (task i trains into OUT/run-i)")
    p.add_argument("--sbatch", default="", help="more sbatch options, one string: --sbatch='--partition=gpu'")
    p.add_argument("--train", default="", help="more flexrank train options, one string: --train='--backend ddp'")
    p.add_argument("--submit", action="store_true", help="run sbatch (default: only print the command)")
    p = ssub.add_parser("collect", help="SWEEP_DIR/results.csv and results.md: every point's metrics, best first")
    p.add_argument("sweep_dir")


def _subnet_arg(value: str):
    if value.endswith(".json") and not value.strip().startswith("{"):
        # A search result (search_best.json: {"config": {...}, ...}) or a plain {group: width} file.
        try:
            data = json.loads(Path(value).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError("--subnet", value, "a readable JSON file with a {group: width} subnet", str(exc))
        return data["config"] if isinstance(data, dict) and isinstance(data.get("config"), dict) else data
    if value.strip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError("--subnet", value, "maximal, heuristic, minimal or a JSON {group: width}", str(exc))
    return value


_LAUNCH_FLAGS = {"nproc": "distributed.nproc", "nnodes": "distributed.nnodes", "node_rank": "distributed.node_rank",
                 "main_process_ip": "distributed.main_process_ip", "main_process_port": "distributed.main_process_port",
                 "backend": "distributed.backend", "resume": "training.resume_from_checkpoint"}


def _train(args) -> int:
    from ..distributed.env import in_launched_process
    from .launch import exit_distributed, format_command, launch_command
    from .signals import run_forwarding_signals
    from ..checks import CHECKED_ENV, already_checked, check_recipe
    from ..config import load_config
    from ..models.assets import pin_hub_model
    from ..checkpoints.preemption import Preempted
    from ..data.cache import max_bytes as cache_cap

    overrides = args.overrides + [f"{key}={getattr(args, flag)}" for flag, key in _LAUNCH_FLAGS.items()
                                  if getattr(args, flag) is not None]
    cfg = load_config(args.recipe, overrides)  # validated here, before any process is started
    cache_cap()  # FLEXRANK_CACHE_MAX_GB too
    overrides += pin_hub_model(cfg.model)  # a hub id: resolved once, here; launched processes get the commit
    if not already_checked():  # everything checkable without weights, before any model loads
        check_recipe(cfg, build_training_arguments=not in_launched_process())
    dist = cfg.distributed
    if dist.nproc * dist.nnodes > 1 and not in_launched_process():
        argv = ["train"] + ([args.recipe] if args.recipe else []) + [a for o in overrides for a in ("--set", o)]
        cmd, env = launch_command(dist, argv)
        print(f"[flexrank] launching: {format_command(cmd, env)}", flush=True)
        return run_forwarding_signals(cmd, {**os.environ, **env, CHECKED_ENV: "1"}, Path(cfg.training["output_dir"]))
    from ..run import train  # heavy: only once the recipe passed its checks

    status = 0
    try:
        train(cfg)
    except Preempted as stop:
        status = _stopped(stop, Path(cfg.training["output_dir"]))
    if in_launched_process():
        exit_distributed(status)
    return status


def _stopped(stop, run_dir: Path) -> int:
    """A run, evaluation or search stopped on a signal: say what was kept, mark the run folder for the launching
    process (checkpoints/preemption.py), and exit PREEMPTED_EXIT."""
    from ..checkpoints.preemption import PREEMPTED_EXIT, PREEMPTED_MARK
    from ..distributed.env import is_main_process
    from ..io import write_atomic

    print(f"[flexrank] {stop}", flush=True)
    if is_main_process():
        write_atomic(run_dir / PREEMPTED_MARK, f"{stop}\n")
    return PREEMPTED_EXIT


def _check(args) -> None:
    from ..checks import check_recipe
    from ..config import dump_config, load_config

    cfg = load_config(args.recipe, args.overrides)
    report = check_recipe(cfg)
    print(dump_config(cfg), end="")
    if report:  # YAML comments: stdout stays the resolved recipe
        from ..elastic.cost import format_size_report

        print("# size, Linear layers counted as LoNAS/NNCF count them (params in x out, MACs per token in x out):")
        print("\n".join(f"#   {line}" for line in format_size_report(report).splitlines()))


def _prepare(args) -> None:
    from ..models.assets import minilm_dir, smollm2_dir
    from ..models.hub import is_hub_id, snapshot

    if args.revision and not args.model:
        raise ConfigError("--revision", args.revision, "only with --model ORG/NAME")
    if args.model:
        if not is_hub_id(args.model):
            raise ConfigError("--model", args.model, "a hub model id (org/name)")
        path, commit = snapshot(args.model, args.revision)
        print(f"[flexrank] ready: {args.model} commit {commit} in {path}")
        return
    from ..data.corpora import analogies_file, polarity_file

    for item in (smollm2_dir(), minilm_dir(), analogies_file(), polarity_file()):
        print(f"[flexrank] ready: {item}")


def _export(args) -> None:
    from ..adapters.export import save_export
    from ..adapters.registry import load_run, method_for
    from ..config import load_config

    if not (args.out or args.compact):
        raise ConfigError("--out", None, "--out DIR (plain adapter) and/or --compact DIR (smaller merged model)")
    if args.keep_adapter and not args.compact:
        raise ConfigError("--keep-adapter", True, "only with --compact DIR")
    for key, folder in (("--out", args.out), ("--merge-sparse", args.merge_sparse), ("--compact", args.compact)):
        if folder:
            refuse_foreign(folder, key)  # before the model loads
    method_for(load_config(Path(args.run_dir) / "config.yaml")).check_export(args.out, args.compact, args.merge_sparse)
    run = load_run(args.run_dir)
    method = run.method
    subnet = method.activate(_subnet_arg(args.subnet))  # elastic runs: any subnet; others export what they learned
    if subnet is not None:
        print(f"[flexrank] subnet: {subnet}")
    if args.out:
        print(json.dumps({k: v for k, v in method.export_adapter(args.out, tokenizer=run.tokenizer).items()
                          if k != "rank_pattern"}))
    if args.compact:
        from ..elastic.compact import export_compact

        summary = export_compact(method.model, method.base_widths(), args.compact, merge=not args.keep_adapter,
                                 tokenizer=run.tokenizer)
        print(f"[flexrank] compact model in {args.compact}: " + json.dumps(
            {k: summary[k] for k in ("params", "adapter_params", "intermediate_size", "num_attention_heads",
                                     "num_key_value_heads", "merged")}))
    if args.merge_sparse:
        from ..adapters.sparsity import sparse_merge, sparsity_of

        merged = sparse_merge(method.model)
        sparsity = sparsity_of(merged)
        save_export(args.merge_sparse, merged.save_pretrained, {"sparsity": sparsity}, "--merge-sparse")
        print(f"[flexrank] merged model in {args.merge_sparse}: sparsity {sparsity:.4f}")


def _eval(args) -> int:
    from ..checkpoints.preemption import Preempted, catch_signals

    catch_signals()  # SIGTERM/SIGUSR1: stop at the next batch, exit PREEMPTED_EXIT (nothing to keep: rerun it)
    try:
        _evaluate_run_dir(args)
    except Preempted as stop:
        return _stopped(stop, Path(args.run_dir))
    return 0


def _evaluate_run_dir(args) -> None:
    from ..adapters.registry import load_run
    from ..data import records as data_lib
    from ..data.pipeline import load_data, tokenize
    from ..evaluation.metrics import evaluate_run

    run = load_run(args.run_dir)
    cfg, method = run.cfg, run.method
    run_data = load_data(cfg)
    eval_set = tokenize(cfg, run.tokenizer, run_data.eval, run_data.kind)
    collator = data_lib.make_collator(run.tokenizer, False)
    for subnet in method.subnets_to_evaluate(args.subnet):
        method.activate(_subnet_arg(subnet) if subnet is not None else None)
        print(json.dumps({"subnet": subnet, **evaluate_run(cfg, method.model, run.tokenizer, run_data, eval_set,
                                                           collator)}, default=str))


def _slurm(args) -> int:
    import shlex

    from . import slurm

    if args.slurm_command == "sweep":
        return slurm.sweep(args.recipe, args.set_grid, Path(args.out), shlex.split(args.sbatch),
                           shlex.split(args.train), args.submit)
    slurm.collect(Path(args.sweep_dir))
    print((Path(args.sweep_dir) / "results.md").read_text(), end="")


def _search(args) -> int:
    from ..distributed.env import in_launched_process
    from .launch import exit_distributed, format_command, free_port, launch_command
    from .signals import run_forwarding_signals
    from ..checkpoints.preemption import Preempted, catch_signals
    from ..config import DistributedConfig
    from ..elastic.search import load_search_config, search

    load_search_config(Path(args.run_dir), args.overrides)  # refuse bad input before starting any process
    if args.nproc and args.nproc > 1 and not in_launched_process():
        dist = DistributedConfig(backend="ddp", nproc=args.nproc, main_process_port=free_port())
        cmd, env = launch_command(dist, ["search", args.run_dir] + [a for o in args.overrides for a in ("--set", o)])
        print(f"[flexrank] launching: {format_command(cmd, env)}", flush=True)
        return run_forwarding_signals(cmd, {**os.environ, **env}, Path(args.run_dir))
    if in_launched_process():
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())  # the process group the search splits subnets over
    catch_signals()  # SIGTERM/SIGUSR1: every process stops at its next batch; evaluated subnets stay cached
    status = 0
    try:
        search(args.run_dir, args.overrides)
    except Preempted as stop:
        status = _stopped(stop, Path(args.run_dir))
    if in_launched_process():
        exit_distributed(status)
    return status


def _cache(args) -> None:
    from ..data import cache

    chosen = cache.entries(args.category)
    if args.older_than:
        cutoff = time.time() - cache.older_than(args.older_than)
        chosen = [e for e in chosen if e.last_used < cutoff]
    if not args.clear:
        print(cache.report(chosen, each=args.entries))
        return
    removed, in_use = cache.remove(chosen)
    print(f"[flexrank] cache: removed {len(removed)} entries ({cache.format_bytes(sum(e.bytes for e in removed))})"
          + (f"; kept {len(in_use)} in use by a running job: {', '.join(str(e.path) for e in in_use)}" if in_use else ""))


COMMANDS = {"train": _train, "check": _check, "prepare": _prepare, "export": _export, "eval": _eval,
            "slurm": _slurm, "search": _search, "cache": _cache}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if getattr(args, "recipe", None):
            args.recipe = find_recipe(args.recipe)
        return COMMANDS[args.command](args) or 0
    except ConfigError as exc:
        for error in getattr(exc, "errors", [exc]):  # every problem found, one line each
            print(f"flexrank: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
