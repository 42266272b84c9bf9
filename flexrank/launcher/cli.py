"""`flexrank` command line. Bad input ends with a one-line message naming the key (exit 2), never a traceback."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from ..trainer.errors import ConfigError


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="YAML recipe (default: the embedded SmolLM2 word-analogy run)")
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
    sub.add_parser("prepare", help="convert the bundled model and fetch the bundled data sets into the cache")
    p = sub.add_parser("export", help="write a run's (sub)network as a plain peft LoRA adapter")
    p.add_argument("run_dir")
    p.add_argument("--subnet", default="heuristic",
                   help="maximal | heuristic | minimal | a JSON {group: width} (elastic runs; AdaLoRA and SoRA "
                        "runs export the ranks they learned)")
    p.add_argument("--out", required=True, help="output folder of the plain adapter")
    p.add_argument("--merge-sparse", metavar="DIR",
                   help="also write the base with the adapter merged, keeping the base's zeros (Shears/SparsePEFT)")
    p = sub.add_parser("eval", help="evaluate a finished run's adapter (elastic: one or more subnets)")
    p.add_argument("run_dir")
    p.add_argument("--subnet", action="append", help="subnet(s) to evaluate (elastic runs)")
    return parser


def _subnet_arg(value: str):
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
    from .launch import format_command, in_launched_process, launch_command
    from ..trainer.checks import CHECKED_ENV, already_checked, check_recipe
    from ..trainer.config import load_config

    overrides = args.overrides + [f"{key}={getattr(args, flag)}" for flag, key in _LAUNCH_FLAGS.items()
                                  if getattr(args, flag) is not None]
    cfg = load_config(args.recipe, overrides)  # validated here, before any process is started
    if not already_checked():  # everything checkable without weights, before any model loads
        check_recipe(cfg, build_training_arguments=not in_launched_process())
    dist = cfg.distributed
    if dist.nproc * dist.nnodes > 1 and not in_launched_process():
        argv = ["train"] + ([args.recipe] if args.recipe else []) + [a for o in overrides for a in ("--set", o)]
        cmd, env = launch_command(dist, argv)
        print(f"[flexrank] launching: {format_command(cmd, env)}", flush=True)
        return subprocess.run(cmd, env={**os.environ, **env, CHECKED_ENV: "1"}).returncode
    from ..trainer.run import train  # heavy: only once the recipe passed its checks

    train(cfg)
    if in_launched_process():
        _exit_distributed()
    return 0


def _exit_distributed() -> None:
    """Tear down and leave at once: distributed CPU processes sometimes abort in interpreter teardown after
    finishing, which fails the whole launch (reference: distributed.md §5)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _check(args) -> None:
    from ..trainer.checks import check_recipe
    from ..trainer.config import dump_config, load_config

    cfg = load_config(args.recipe, args.overrides)
    check_recipe(cfg)
    print(dump_config(cfg), end="")


def _prepare(args) -> None:
    from ..trainer.assets import minilm_dir, smollm2_dir
    from ..trainer.corpora import analogies_file, polarity_file

    for item in (smollm2_dir(), minilm_dir(), analogies_file(), polarity_file()):
        print(f"[flexrank] ready: {item}")


def _export(args) -> None:
    from ..trainer.controllers import ElasticController
    from ..trainer.export import export_plain_adapter, refuse_foreign_folder, save_export
    from ..trainer.run import load_run

    refuse_foreign_folder(Path(args.out), "--out")  # before the model loads
    if args.merge_sparse:
        refuse_foreign_folder(Path(args.merge_sparse), "--merge-sparse")
    _, _, peft_model, controller = load_run(args.run_dir)
    if isinstance(controller, ElasticController):  # any subnet; AdaLoRA/SoRA export the ranks they learned
        print(f"[flexrank] subnet: {controller.activate(_subnet_arg(args.subnet))}")
    print(json.dumps({k: v for k, v in export_plain_adapter(peft_model, args.out).items() if k != "rank_pattern"}))
    if args.merge_sparse:
        from ..trainer.sparsity import sparse_merge, sparsity_of

        merged = sparse_merge(peft_model)
        save_export(args.merge_sparse, merged.save_pretrained, {"sparsity": sparsity_of(merged)}, "--merge-sparse")
        print(f"[flexrank] merged model in {args.merge_sparse}: sparsity {sparsity_of(merged):.4f}")


def _eval(args) -> None:
    from ..trainer import data as data_lib
    from ..trainer.controllers import ElasticController
    from ..trainer.run import evaluate, load_data, load_run, tokenize

    cfg, tokenizer, peft_model, controller = load_run(args.run_dir)
    run_data = load_data(cfg)
    eval_set = tokenize(cfg, tokenizer, run_data.eval, run_data.kind)
    collator = data_lib.make_collator(tokenizer, False)
    elastic = isinstance(controller, ElasticController)
    for subnet in (args.subnet or ["heuristic"]) if elastic else [None]:
        if elastic:
            controller.activate(_subnet_arg(subnet))
        print(json.dumps({"subnet": subnet, **evaluate(cfg, peft_model, tokenizer, run_data, eval_set, collator)},
                         default=str))


COMMANDS = {"train": _train, "check": _check, "prepare": _prepare, "export": _export, "eval": _eval}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except ConfigError as exc:
        for error in getattr(exc, "errors", [exc]):  # every problem found, one line each
            print(f"flexrank: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
