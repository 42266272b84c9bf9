"""`eval.metrics`: which task metrics a run reports, checked up front, and one evaluation phase computing them.

Names: `loss` (held-out next-token loss), `exact_match` (greedy generation, normalised), `choice` (accuracy over a
closed label set by answer log-likelihood, no generation), or a user function `package.module:function` called
as function(predictions, references) on the greedy generations, returning a number or a {name: number} dict.
"""

import importlib
import itertools
import re
import time
from dataclasses import replace
from numbers import Real

from ..data.records import DROPPED, FITS, encode_chat_text, reference_answer, tokenize_records
from ..distributed.backends import evaluation_parameters
from ..errors import ConfigError
from .sharding import Shard, current_shard
from .scoring import (
    Limits,
    accuracy,
    batches_of,
    choice_records_per_batch,
    choice_items,
    choose_answers,
    evaluate_classification,
    evaluate_loss,
    exact_match_report,
    generate_answers,
    generation_prompts,
    normalise,
    progress_bar,
)

BUILTIN = ("loss", "exact_match", "choice")
TASK_METRICS = ("exact_match", "choice", "accuracy")  # a run is judged by these first, then user metrics, then loss
LOWER_IS_BETTER = ("loss", "perplexity", "train_loss")
ALLOWED = "'auto', or a list of loss, exact_match, choice, package.module:function"
MAX_LABELS = 64  # more distinct answers than this is not a closed label set: give eval.choices
_USER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def check_metrics(value) -> list[str] | str:
    """The validated eval.metrics value ('auto' or a list of names); a ConfigError names the bad entry."""
    if value == "auto":
        return value
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        raise ConfigError("eval.metrics", value, ALLOWED)
    for name in names:
        if not isinstance(name, str) or (name not in BUILTIN and not _USER.match(name)):
            raise ConfigError("eval.metrics", name, ALLOWED)
        if ":" in name:
            user_metric(name)
    if len(set(names)) != len(names):
        raise ConfigError("eval.metrics", names, ALLOWED, "each metric once")
    return names


def user_metric(spec: str):
    """The callable named by 'package.module:function' (importable from the working directory or PYTHONPATH)."""
    module, _, function = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("eval.metrics", spec, "an importable package.module:function", str(exc)) from None
    if not callable(fn):
        raise ConfigError("eval.metrics", spec, "a callable function(predictions, references)")
    return fn


def resolve(metrics, kind: str, bundled_task: bool, records: list[dict], tokenizer, max_new_tokens: int) -> list[str]:
    """'auto': the bundled tasks keep their metrics; a user file of short answers (each fits max_new_tokens)
    gets exact_match and loss; other text gets loss. An explicit list is checked against the data's kind."""
    if metrics == "auto":
        if kind != "generation":
            return ["loss"]
        short = bundled_task or all(len(encode_chat_text(tokenizer, reference_answer(r))) <= max_new_tokens
                                    for r in records)
        return ["loss", "exact_match"] if short else ["loss"]
    if kind != "generation" and set(metrics) - {"loss"}:
        raise ConfigError("eval.metrics", metrics, "loss only, for plain-text data",
                          "exact_match, choice and user functions need prompt/answer records")
    return list(metrics)


def higher_is_better(name: str) -> bool:
    return name not in LOWER_IS_BETTER


def headline(names) -> str:
    """The metric a run is judged by, among the metric names it reports (or computes): its task metric (exact
    match, choice or classifier accuracy, then the first user function), else the loss."""
    names = list(names)
    return next((n for n in TASK_METRICS if n in names), next((n for n in names if ":" in n), "loss"))


def reported_name(spec: str) -> str:
    """The result key of an eval.metrics entry (a user function's is its function name, when it returns a number)."""
    return spec.partition(":")[2] if ":" in spec else spec


def metric_to_score(requested: str, resolved: list[str]) -> tuple[list[str], str]:
    """For a search or sweep that scores on `requested` ('auto', or any name the run reports), the eval metrics to
    compute (a subset of the run's `resolved` ones) and the result key to read. A ConfigError lists what the run
    reports otherwise."""
    if requested == "auto":
        requested = reported_name(headline(resolved))
    users = [m for m in resolved if ":" in m]
    if requested in resolved and ":" not in requested:
        return [requested], requested
    if requested == "perplexity" and "loss" in resolved:
        return ["loss"], requested
    exact = [m for m in users if requested in (m, reported_name(m))]
    if exact:
        return exact[:1], reported_name(exact[0])
    if users:  # a key of a user function's {name: number} result: known once it runs
        return users, requested
    raise ConfigError("search.metric", requested, f"auto or a metric the run reports: "
                      f"{sorted({reported_name(m) for m in resolved} | ({'perplexity'} if 'loss' in resolved else set()))}")


def label_set(cfg_choices: list[str] | None, records) -> list[str]:
    """eval.choices, or the distinct answers of the data (first-seen order, normalised duplicates merged)."""
    if cfg_choices:
        return list(cfg_choices)
    seen: dict[str, str] = {}
    for r in records:
        seen.setdefault(normalise(reference_answer(r)), reference_answer(r))
    if len(seen) > MAX_LABELS:
        raise ConfigError("eval.metrics", "choice", f"data with at most {MAX_LABELS} distinct answers",
                          f"found {len(seen)}; list the labels in eval.choices")
    return list(seen.values())


def evaluate_task(model, tokenizer, records: list[dict], eval_set, collator, metrics: list[str], *,
                  labels: list[str] | None = None, batch_size: int = 32, max_new_tokens: int = 8,
                  shard: Shard | None = None, show_progress: bool = True, limits: Limits = Limits(),
                  gather_parameters="auto") -> dict:
    """One evaluation phase: every requested metric, sharded over the processes, one progress bar. Inputs are cut
    to `limits` (eval_set, the loss's, was tokenized with them). Under ZeRO-3 / FSDP2 the full parameters are
    gathered once for the phase when `gather_parameters` says so (evaluation_parameters)."""
    with evaluation_parameters(model, gather_parameters) as collective:
        shard = replace(shard or current_shard(), collective=collective)
        return _evaluate_task(model, tokenizer, records, eval_set, collator, metrics, labels, batch_size,
                              max_new_tokens, shard, show_progress, limits)


def _evaluate_task(model, tokenizer, records, eval_set, collator, metrics, labels, batch_size, max_new_tokens,
                   shard: Shard, show_progress: bool, limits: Limits) -> dict:
    generates = any(m == "exact_match" or ":" in m for m in metrics)
    total = (batches_of(len(eval_set), batch_size, shard) if "loss" in metrics else 0) + \
        (batches_of(len(records), batch_size, shard) if generates else 0) + \
        (batches_of(len(records), choice_records_per_batch(batch_size, len(labels)), shard)
         if "choice" in metrics else 0)
    result: dict = {}
    timings: dict[str, float] = {}  # seconds per part of the phase (bench/eval_time.py reads them)
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name], clock = round(time.perf_counter() - clock, 3), time.perf_counter()

    with progress_bar(total, shard, show=show_progress) as bar:
        if "loss" in metrics:
            result.update(evaluate_loss(model, eval_set, collator, batch_size=batch_size, shard=shard, progress=bar))
            lap("loss")
        if "choice" in metrics:
            chosen = choose_answers(model, tokenizer, records, labels, batch_size=batch_size, shard=shard, progress=bar,
                                    limits=limits)
            refs = [normalise(reference_answer(r)) for r in records]
            result["choice"] = accuracy([normalise(c) for c in chosen], refs)
            result["choice_labels"] = len(labels)
            lap("choice")
        if generates:
            preds = generate_answers(model, tokenizer, records, batch_size, max_new_tokens, shard, progress=bar,
                                     limits=limits)
            refs = [reference_answer(r) for r in records]
            if "exact_match" in metrics:
                result.update(exact_match_report(preds, records))
            for spec in (m for m in metrics if ":" in m):
                result.update(_user_result(spec, user_metric(spec)(preds, refs)))
            lap("generation")
    result["n"] = len(records)
    result["timings"] = timings
    return result


def truncation_report(tokenizer, records, metrics, labels, limits: Limits, max_new_tokens: int) -> dict:
    """How many held-out prompts were cut to the limit for any of the phase's inputs (the loss's record with its
    reference answer, the choice prompt that fits the longest label, the generation prompt), and how many records
    the loss dropped (prompt shorter than min_prompt_length beside the answer, as training drops them)."""
    cut: set[int] = set()
    dropped = 0
    if "loss" in metrics:
        statuses = [status for _, status in tokenize_records(tokenizer, records, limits.max_length,
                                                             truncation=limits.truncation,
                                                             min_prompt_length=limits.min_prompt_length)]
        cut |= {i for i, status in enumerate(statuses) if status != FITS}
        dropped = statuses.count(DROPPED)
    if "choice" in metrics:
        cut |= {i for i, item in enumerate(choice_items(tokenizer, records, labels, limits)) if item.status != FITS}
    if any(m == "exact_match" or ":" in m for m in metrics):
        cut |= {i for i, (_, status) in enumerate(generation_prompts(tokenizer, records, limits, max_new_tokens))
                if status != FITS}
    return {"max_length": limits.max_length, "truncated": len(cut), "dropped": dropped}


def _user_result(spec: str, value) -> dict:
    name = spec.partition(":")[2]
    if isinstance(value, Real) and not isinstance(value, bool):
        return {name: float(value)}
    if isinstance(value, dict) and value and all(isinstance(v, Real) and not isinstance(v, bool) for v in value.values()):
        return {str(k): float(v) for k, v in value.items()}
    raise ConfigError("eval.metrics", spec, "a function returning a number or a {name: number} dict",
                      f"it returned {type(value).__name__}")


def evaluate_classifier(model, tokenizer, records, batch_size: int, max_length: int, shard: Shard | None = None) -> dict:
    """Sequence-classification models: accuracy of argmax(logits), sharded, with the phase's one bar."""
    shard = shard or current_shard()
    with progress_bar(batches_of(len(records), batch_size, shard), shard) as bar:
        return evaluate_classification(model, tokenizer, records, batch_size, max_length, shard=shard, progress=bar)


def summary_line(m: dict) -> str:
    """One line per evaluation phase: the task metrics first (user metrics too), then loss, then the time."""
    first = TASK_METRICS
    skip = ("n", "tokens", "choice_labels", "seconds", "max_length", "truncated", "dropped", "active_rank",
            "active_lora_params", "loss", "perplexity")
    keys = [k for k in first if k in m] + [k for k, v in m.items() if k not in first + skip
                                           and isinstance(v, (int, float)) and not isinstance(v, bool)]
    line = ", ".join(f"{k}={m[k]:.4f}" for k in keys + [k for k in ("loss", "perplexity") if k in m])
    facts = [f"{m['n']} records"] if "n" in m else []
    if "truncated" in m:
        facts.append(f"{m['truncated']} prompts truncated to {m['max_length']} tokens"
                     + (f", {m['dropped']} too long for the loss" if m.get("dropped") else ""))
    if "seconds" in m:
        facts.append(f"{m['seconds']:.1f} s")
    return line + (f" ({', '.join(facts)})" if "seconds" in m else "")


def evaluate_run(cfg, model, tokenizer, run_data, eval_set, collator) -> dict:
    """One evaluation phase of a run: its eval.metrics on the held-out records (sharded over the processes), or
    accuracy for a classifier."""
    if run_data.kind == "classification":
        return evaluate_classifier(model, tokenizer, run_data.eval, cfg.eval.batch_size, cfg.data.max_length)
    start = time.perf_counter()
    metrics = resolve(cfg.eval.metrics, run_data.kind, bool(cfg.data.task), run_data.eval, tokenizer,
                      cfg.eval.max_new_tokens)
    labels = None
    if "choice" in metrics:
        labels = label_set(cfg.eval.choices, itertools.chain(run_data.train_records(), run_data.eval))
    limits = eval_limits(cfg)
    result = evaluate_task(model, tokenizer, run_data.eval, eval_set, collator, metrics, labels=labels,
                           batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens, limits=limits,
                           gather_parameters=cfg.eval.gather_parameters)
    result.update(truncation_report(tokenizer, run_data.eval, metrics, labels, limits, cfg.eval.max_new_tokens))
    return {**result, "seconds": round(time.perf_counter() - start, 3)}


def eval_limits(cfg) -> Limits:
    """The training's length limits, or eval.max_length in place of data.max_length when the recipe sets it."""
    data = cfg.eval_data()
    return Limits(data.max_length, data.truncation, data.min_prompt_length)
