"""`flexrank search RUN_DIR`: NSGA-II over a trained elastic supernet (LoNAS's search step), into RUN_DIR/search/.

Every subnet is the same loaded model with other masks (controller.activate), scored by the task metric on a
slice of the run's held-out records (exact match, accuracy, or the held-out loss when the task has none) and by
its cost (cost.py). Before the search, the reference subnets are scored the same way: maximal, heuristic,
minimal and NNCF NLS's candidates (per group the most often trained width; the 5 configurations with the
lowest mean training loss). Results go to an on-disk cache, so a search resumes where it stopped; the
processes of one `accelerate launch` (DDP) split each generation's candidates between them.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError
from ..evaluation import metrics as metrics_lib
from .search_space import read_nncf_json
from .cost import CostModel, subnet_cost
from .nsga import NSGASettings, nsga2
from ..io import file_sha256, mark_owned, refuse_foreign, write_json
from .results import EvalCache, Row, config_key, digest, front_rows, plot, select_best, write_csv

# NNCF BootstrapNAS's search defaults (v2.19 search.py). acc_delta: NNCF's 1 point of percent accuracy, here a
# fraction (LoNAS writes fractions: ref_acc 0.45, acc_delta 0.01). ref_acc -1: the maximal subnet's metric.
SEARCH_DIR = "search"  # in the run folder: progression, best subnet, evaluation cache
NNCF_DEFAULTS = {**asdict(NSGASettings()), "ref_acc": -1.0, "acc_delta": 0.01}
_NNCF_SEARCH = "bootstrapNAS.search"
_NNCF_KEYS = set(NNCF_DEFAULTS) | {"algorithm", "num_constraints", "batchnorm_adaptation"}
NLS_LOSS_CANDIDATES = 5


@dataclass(frozen=True)
class SearchSettings:
    nsga: NSGASettings
    ref_acc: float | None   # None: the maximal subnet's metric
    acc_delta: float
    eval_offset: int
    eval_size: int | None   # None: every held-out record from eval_offset, less test_size
    test_size: int


def _nncf_search_section(cfg) -> dict:
    elastic = cfg.adapter.elastic
    if elastic is None or not elastic.nncf_config:
        return {}
    try:
        nncf = read_nncf_json(elastic.nncf_config)
    except (OSError, ValueError) as err:
        raise ConfigError("adapter.elastic.nncf_config", elastic.nncf_config, "a readable NNCF JSON file",
                          str(err)) from None
    section = nncf.get("bootstrapNAS", {}).get("search", {})
    if not isinstance(section, dict):
        raise ConfigError(_NNCF_SEARCH, section, "a mapping")
    unknown = sorted(set(section) - _NNCF_KEYS)
    if unknown:
        raise ConfigError(f"{_NNCF_SEARCH}.{unknown[0]}", section[unknown[0]], f"one of {sorted(_NNCF_KEYS)}")
    if section.get("algorithm", "NSGA2") != "NSGA2":
        raise ConfigError(f"{_NNCF_SEARCH}.algorithm", section["algorithm"], "NSGA2 (flexrank's only search)")
    if section.get("num_constraints", 0):
        raise ConfigError(f"{_NNCF_SEARCH}.num_constraints", section["num_constraints"], "0 (no constraints)")
    return {k: v for k, v in section.items() if k in NNCF_DEFAULTS}


def resolve_settings(cfg, metric_higher_is_better: bool = True) -> SearchSettings:
    """The recipe's `search:` keys, else the NNCF JSON's bootstrapNAS.search, else NNCF's defaults."""
    recipe = cfg.search
    nncf = _nncf_search_section(cfg)
    values = {}
    for key, default in NNCF_DEFAULTS.items():
        value = getattr(recipe, key)
        source = f"search.{key}"
        if value is None and key in nncf:
            value, source = nncf[key], f"{_NNCF_SEARCH}.{key}"
        values[key] = (default if value is None else value, source)
    for key in ("num_evals", "population"):
        value, source = values[key]
        if not (isinstance(value, int) and value > 0):
            raise ConfigError(source, value, "a positive integer")
    if values["num_evals"][0] < values["population"][0]:
        raise ConfigError(values["num_evals"][1], values["num_evals"][0],
                          f">= search.population ({values['population'][0]}): one generation at least")
    ref, source = values["ref_acc"]
    ref = None if ref == -1 else float(ref)
    if ref is not None and metric_higher_is_better and not 0 <= ref <= 1:
        raise ConfigError(source, ref, "a metric in [0, 1], or -1 for the maximal subnet's metric")
    if ref is not None and not metric_higher_is_better and ref <= 0:
        raise ConfigError(source, ref, "a held-out loss > 0, or -1 for the maximal subnet's loss")
    delta, source = values["acc_delta"]
    if not (isinstance(delta, (int, float)) and delta >= 0):
        raise ConfigError(source, delta, "a number >= 0")
    nsga = NSGASettings(**{k: values[k][0] for k in asdict(NSGASettings())})
    return SearchSettings(nsga, ref, float(delta), recipe.eval_offset, recipe.eval_size, recipe.test_size)


def nls_candidates(space, seed: int, steps_per_epoch: int, steps: list[int], losses: dict[int, float]) -> dict:
    """NNCF NLS's extra candidates: per group the width trained most often (ties: the larger), and the
    NLS_LOSS_CANDIDATES configurations with the lowest mean training loss."""
    trained = {step: space.config_for_step(seed, step, steps_per_epoch) for step in steps}
    candidates = {}
    if trained:
        counts = {g.name: Counter(c[g.name] for c in trained.values()) for g in space.groups}
        candidates["nls_frequent"] = {g.name: max(g.widths, key=lambda w: (counts[g.name][w], w))
                                      for g in space.groups}
    by_config = defaultdict(list)
    for step, loss in losses.items():
        if step in trained:
            by_config[config_key(trained[step])].append(loss)
    ranked = sorted(by_config, key=lambda k: (sum(by_config[k]) / len(by_config[k]), k))
    for i, key in enumerate(ranked[:NLS_LOSS_CANDIDATES], 1):
        candidates[f"nls_loss_{i}"] = json.loads(key)
    return candidates


class Workers:
    """The processes of one launch: split a list of tasks, gather the results everywhere. One process: a no-op."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self.dist.get_rank() if self.dist else 0
        self.world = self.dist.get_world_size() if self.dist else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def same_everywhere(self, value):
        if self.dist is None:
            return value
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, mine: dict) -> dict:
        if self.dist is None:
            return mine
        parts = [None] * self.world
        self.dist.all_gather_object(parts, mine)
        return {k: v for part in parts for k, v in part.items()}


class SubnetScorer:
    """The metric of one subnet on fixed held-out records, computed by the code that evaluates a run (the metric
    `search.metric` names: any the run reports; auto: the run's task metric). Only the masks change between subnets."""

    def __init__(self, cfg, model, tokenizer, controller, run_data, records: list[dict],
                 metric: tuple[list[str], str]):
        """`metric`: (the eval metrics to compute, the result key scored), from run_metric."""
        from ..data import records as data_lib
        from ..data.pipeline import tokenize

        self.cfg, self.model, self.tokenizer, self.controller = cfg, model, tokenizer, controller
        self.kind, self.records = run_data.kind, records
        self.compute, self.name = metric
        self.higher_is_better = metrics_lib.higher_is_better(self.name)
        self.labels = metrics_lib.label_set(cfg.eval.choices, itertools.chain(run_data.train_records(),
                                                                            run_data.eval)) \
            if "choice" in self.compute else None
        self.dataset = tokenize(cfg, tokenizer, records, self.kind) if "loss" in self.compute else None
        self.collator = data_lib.make_collator(tokenizer, False)

    def identity(self) -> dict:
        return {"metric": self.name, "computed": self.compute, "records": self.records, "labels": self.labels,
                "max_new_tokens": self.cfg.eval.max_new_tokens,
                "max_length": self.cfg.eval_data().max_length, "truncation": self.cfg.data.truncation,
                "min_prompt_length": self.cfg.data.min_prompt_length}

    def __call__(self, config: dict[str, int]) -> float:
        from ..evaluation.scoring import evaluate_classification
        from ..evaluation.sharding import Shard

        self.controller.activate(config)
        c = self.cfg
        if self.kind == "classification":
            return evaluate_classification(self.model, self.tokenizer, self.records, batch_size=c.eval.batch_size,
                                           max_length=c.data.max_length)["accuracy"]
        # Every process scores whole subnets (the search splits subnets, not records): no sharding here.
        result = metrics_lib.evaluate_task(self.model, self.tokenizer, self.records, self.dataset, self.collator,
                                           self.compute, labels=self.labels, batch_size=c.eval.batch_size,
                                           max_new_tokens=c.eval.max_new_tokens, shard=Shard(), show_progress=False,
                                           limits=metrics_lib.eval_limits(c))
        if self.name not in result:
            raise ConfigError("search.metric", self.name, f"a metric the run reports: {sorted(result)}")
        return result[self.name]


def run_metric(cfg, run_data, tokenizer) -> tuple[list[str], str]:
    """(the eval metrics to compute, the result key scored) for search.metric on this run; a classifier has only its
    accuracy (computed by its own loop)."""
    if run_data.kind == "classification":
        if cfg.search.metric not in ("auto", "accuracy"):
            raise ConfigError("search.metric", cfg.search.metric, "auto or accuracy for a classification run")
        return [], "accuracy"
    resolved = metrics_lib.resolve(cfg.eval.metrics, run_data.kind, bool(cfg.data.task), run_data.eval, tokenizer,
                                   cfg.eval.max_new_tokens)
    return metrics_lib.metric_to_score(cfg.search.metric, resolved)


def score_all(configs: list[dict], scorer, cache: EvalCache, workers: Workers, progress=None) -> list[float]:
    """Metric of each config: from the cache, else evaluated here or by another process of the launch."""
    cache.refresh()  # other jobs sharing the cache may have added results
    todo = list({config_key(c): c for c in configs if cache.get(c) is None}.values())
    todo = workers.same_everywhere(todo)  # what process 0 sees decides the split
    mine = {}
    for config in todo[workers.rank::workers.world]:
        mine[config_key(config)] = metric = float(scorer(config))
        cache.put(config, metric)
        if progress is not None:
            progress.update(workers.world)  # the others evaluate as many meanwhile; exact again per generation
    for key, metric in workers.gather(mine).items():
        cache.results[key] = metric
    return [cache.get(c) for c in configs]


def _check_backend() -> None:
    # Under ZeRO-3 / FSDP2 every process must run every forward (sharded weights): splitting candidates would
    # hang. Those searches would split the data instead, which flexrank does not do yet.
    for var, name in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")):
        if os.environ.get(var, "").lower() in ("1", "true"):
            raise ConfigError("distributed.backend", name, "single or ddp for flexrank search",
                              "the search splits subnets across processes; sharded backends are not supported")


def _trained_steps(run_dir: Path, losses: dict[int, float]) -> list[int]:
    if losses:
        return sorted(losses)
    samples = run_dir / "elastic_samples.jsonl"
    if samples.exists():
        return [json.loads(line)["step"] for line in samples.read_text().splitlines() if line.strip()]
    return []


def load_search_config(run_dir: Path, overrides: list[str]):
    """The run's config with `search.*` overrides; refuses anything but an elastic run."""
    from ..adapters.registry import method_for
    from ..config import load_config

    for assignment in overrides:
        if not assignment.strip().startswith("search."):
            raise ConfigError("--set", assignment, "search.KEY=VALUE",
                              "a search cannot change the run it searches (model, data, adapter, search space)")
    if not (run_dir / "config.yaml").exists():
        raise ConfigError("run_dir", str(run_dir), "a finished flexrank run (a folder with config.yaml)")
    cfg = load_config(run_dir / "config.yaml", overrides)
    if not method_for(cfg).has_subnets:
        raise ConfigError("run_dir", str(run_dir), "an elastic run (adapter.method: elastic)",
                          f"this run's adapter.method is {cfg.adapter.method!r}: it has no subnets to search")
    if not (run_dir / "supernet").exists():
        raise ConfigError("run_dir", str(run_dir), "a run with a supernet/ folder (written when training ends)")
    refuse_foreign(run_dir / SEARCH_DIR, "search output (RUN_DIR/search)")
    # Bad settings fail before the model loads ('auto' is known once the data is: bundled tasks have a task metric).
    resolve_settings(cfg, bool(cfg.data.task) if cfg.search.metric == "auto" else
                     metrics_lib.higher_is_better(cfg.search.metric))
    return cfg


def search(run_dir: str | Path, overrides: list[str] = ()) -> dict:
    """Run the search; returns the summary written to search_best.json (on every process)."""
    from tqdm.auto import tqdm

    from ..adapters.registry import load_run
    from ..data.pipeline import load_data

    run_dir = Path(run_dir)
    load_search_config(run_dir, list(overrides))
    _check_backend()
    workers = Workers()
    run = load_run(run_dir, list(overrides))
    cfg, tokenizer, model, controller = run.cfg, run.tokenizer, run.model, run.controller
    if workers.dist is not None:
        from accelerate import PartialState

        model.to(PartialState().device)
    model.eval()
    space = controller.space
    run_data = load_data(cfg)

    scored = run_metric(cfg, run_data, tokenizer)
    settings = resolve_settings(cfg, metrics_lib.higher_is_better(scored[1]))
    held_out, start = run_data.eval, settings.eval_offset
    size = settings.eval_size if settings.eval_size is not None else len(held_out) - start - settings.test_size
    if size <= 0 or start + size + settings.test_size > len(held_out):
        raise ConfigError("search.eval_size", settings.eval_size,
                          f"eval_offset + eval_size + test_size <= the run's {len(held_out)} held-out records",
                          f"eval_offset={start}, test_size={settings.test_size}")
    scorer = SubnetScorer(cfg, model, tokenizer, controller, run_data, held_out[start:start + size], scored)
    out = run_dir / SEARCH_DIR
    if workers.main:
        out.mkdir(exist_ok=True)
        mark_owned(out)
    setup_id = digest(file_sha256(run_dir / "supernet" / "adapter_model.safetensors"), scorer.identity(),
                      [(g.name, g.widths) for g in space.groups])
    cache = EvalCache(out / "cache" / f"{setup_id}.jsonl")
    costs = CostModel.of(model)

    def row(generation, source, config, metric) -> Row:
        return Row(generation, source, config, metric, subnet_cost(costs, space, config).as_dict())

    baselines = {name: getattr(space, name)() for name in ("maximal", "heuristic", "minimal")}
    losses = controller.step_losses()
    baselines.update(nls_candidates(space, controller.seed, controller.steps_per_epoch,
                                    _trained_steps(run_dir, losses), losses))
    nsga = settings.nsga
    total = len(baselines) + nsga.generations * nsga.population
    bar = tqdm(total=total, desc="search", unit="subnet", disable=not workers.main)
    rows: list[Row] = []
    for (source, config), metric in zip(baselines.items(),
                                        score_all(list(baselines.values()), scorer, cache, workers, bar)):
        rows.append(row("baseline", source, config, metric))
    bar.n = len(baselines)
    sign = 1 if scorer.higher_is_better else -1
    ref = settings.ref_acc if settings.ref_acc is not None else rows[0].metric  # rows[0]: maximal

    def evaluate(xs):
        configs = [{g.name: g.widths[i] for g, i in zip(space.groups, x)} for x in xs]
        metrics = score_all(configs, scorer, cache, workers, bar)
        return [(row(0, "", c, m).cost["macs"], sign * m) for c, m in zip(configs, metrics)]

    def on_generation(generation, found):
        for _, x, _, metric in found:
            rows.append(row(generation, "nsga2", {g.name: g.widths[i] for g, i in zip(space.groups, x)},
                            sign * metric))
        best = select_best(rows, ref, settings.acc_delta, scorer.higher_is_better)
        bar.n = len(rows)
        bar.set_postfix(gen=generation, evals=len(rows) - len(baselines),
                        best=f"{best.row.metric:.3f}@{best.row.cost['macs'] / 1e6:.2f}M")

    nsga2([len(g.widths) for g in space.groups], evaluate, nsga, on_generation)
    bar.close()
    best = select_best(rows, ref, settings.acc_delta, scorer.higher_is_better)
    summary = {"config": best.row.config, "metric_name": scorer.name, "metric": best.row.metric,
               **best.row.cost, "source": best.row.source, "generation": best.row.generation,
               "qualified": best.qualified, "rule": best.note, "ref_acc": ref, "acc_delta": settings.acc_delta,
               "eval_records": [start, start + size], "evaluations": len(rows) - len(baselines),
               "baselines": {r.source: {"metric": r.metric, **r.cost} for r in rows if r.generation == "baseline"},
               "pareto_front": [{"metric": r.metric, "macs": r.cost["macs"], "params": r.cost["params"],
                                 "source": r.source} for r in front_rows(rows, "macs", scorer.higher_is_better)]}
    if settings.test_size:
        test_records = held_out[start + size:start + size + settings.test_size]
        summary["test"] = _test(SubnetScorer(cfg, model, tokenizer, controller, run_data, test_records, scored), out, {
            "chosen": best.row.config, "heuristic": baselines["heuristic"], "maximal": baselines["maximal"]},
            workers, costs, space)
    if workers.main:
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / "search_progression.csv", rows)
        plot(out / "search_progression.png", rows, best, scorer.name, "macs", scorer.higher_is_better)
        write_json(out / "search_best.json", summary)
        if not best.qualified:
            print(f"[flexrank] search: {best.note}")
        print(f"[flexrank] search: best {scorer.name}={best.row.metric:.4f} at {best.row.cost['macs'] / 1e6:.3f}M "
              f"MACs/token ({best.note}); wrote {out}/search_progression.csv, .png, search_best.json")
    return summary


def _test(scorer, out: Path, subnets: dict, workers, costs, space) -> dict:
    """The chosen, heuristic and maximal subnets on held-out records the search did not use."""
    cache = EvalCache(out / "cache" / f"test-{digest(scorer.identity())}.jsonl")
    metrics = score_all(list(subnets.values()), scorer, cache, workers)
    result = {name: {scorer.name: m, **subnet_cost(costs, space, c).as_dict()}
              for (name, c), m in zip(subnets.items(), metrics)}
    return {**result, "records": len(scorer.records)}
