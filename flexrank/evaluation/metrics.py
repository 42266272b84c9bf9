"""`eval.metrics`: which task metrics a run reports, checked up front, and one evaluation phase computing them.

Names: `loss` (held-out next-token loss), `exact_match` (greedy generation, normalised), `choice` (accuracy over a
closed label set by answer log-likelihood, no generation), or a user function `package.module:function` called
as function(predictions, references) on the greedy generations, returning a number or a {name: number} dict.
"""

import importlib
import re
from numbers import Real

from ..data.records import encode_chat_text, reference_answer
from ..errors import ConfigError
from .sharding import Shard, current_shard
from .scoring import (
    accuracy,
    batches_of,
    choose_answers,
    evaluate_classification,
    evaluate_loss,
    exact_match_report,
    generate_answers,
    normalise,
    progress_bar,
)

BUILTIN = ("loss", "exact_match", "choice")
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
                  shard: Shard | None = None) -> dict:
    """One evaluation phase: every requested metric, sharded over the processes, one progress bar."""
    shard = shard or current_shard()
    generates = any(m == "exact_match" or ":" in m for m in metrics)
    n_choice = len(records) * len(labels or ())
    total = (batches_of(len(eval_set), batch_size, shard) if "loss" in metrics else 0) + \
        (batches_of(len(records), batch_size, shard) if generates else 0) + \
        (batches_of(n_choice, batch_size, shard) if "choice" in metrics else 0)
    result: dict = {}
    with progress_bar(total, shard) as bar:
        if "loss" in metrics:
            result.update(evaluate_loss(model, eval_set, collator, batch_size=batch_size, shard=shard, progress=bar))
        if "choice" in metrics:
            chosen = choose_answers(model, tokenizer, records, labels, batch_size=batch_size, shard=shard, progress=bar)
            refs = [normalise(reference_answer(r)) for r in records]
            result["choice"] = accuracy([normalise(c) for c in chosen], refs)
            result["choice_labels"] = len(labels)
        if generates:
            preds = generate_answers(model, tokenizer, records, batch_size, max_new_tokens, shard, progress=bar)
            refs = [reference_answer(r) for r in records]
            if "exact_match" in metrics:
                result.update(exact_match_report(preds, records))
            for spec in (m for m in metrics if ":" in m):
                result.update(_user_result(spec, user_metric(spec)(preds, refs)))
    result["n"] = len(records)
    return result


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
