"""The bundled demo tasks: real data sets turned into plain train/eval records.

Generation tasks return Alpaca records ({"instruction", "input", "output"}); classification tasks return
{"text", "label"} with integer labels indexing `TaskSpec.labels`. Every split is a pure function of its seed.
"""

import csv
import io
import random
from dataclasses import dataclass
from typing import Callable, Literal

from .corpora import analogies_file, polarity_file
from ..errors import ConfigError

# The semantic part of word2vec's analogies. The syntactic sections (gram1-9) are morphology, which a
# 135M model mostly solves already, so they make a weak fine-tuning demo.
SEMANTIC_SECTIONS = ("capital-common-countries", "capital-world", "currency", "city-in-state", "family")
ANALOGY_INSTRUCTION = "Complete the analogy with one word."
# Share of the word pairs held out for eval. A question uses two pairs (cue a:b, answer c:d), so train gets
# about (1-f)^2 of the questions (~5.7k) and the eval pool about f(1-f) (~1.4k).
HELDOUT_PAIR_FRACTION = 0.2


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: Literal["generation", "classification"]
    split_fn: Callable[..., tuple[list[dict], list[dict]]]  # (seed, eval_size, train_size) -> (train, eval)
    metric: Literal["exact_match", "accuracy"]
    labels: tuple[str, ...] | None  # class names, index = record["label"]; None for generation


def analogy_split(seed: int = 0, eval_size: int = 300, train_size: int | None = None) -> tuple[list[dict], list[dict]]:
    """Word analogies split by word pair, so that no eval answer can be memorised from training.

    A random split leaks: "Athens:Greece :: Baghdad:?" in eval is answered by any training question that
    contains Baghdad:Iraq. Here a held-out pair never occurs in training, as cue or as answer; an eval
    question asks for a held-out pair from a cue pair seen in training.
    """
    rng = random.Random(seed)
    questions = _analogy_questions()
    pairs = sorted({q[:2] for q in questions} | {q[2:] for q in questions})
    held = set(rng.sample(pairs, round(HELDOUT_PAIR_FRACTION * len(pairs))))
    train = [q for q in questions if q[:2] not in held and q[2:] not in held]
    pool = [q for q in questions if q[:2] not in held and q[2:] in held]
    _check_size("data.eval_size", eval_size, len(pool))
    evals = rng.sample(pool, eval_size)
    rng.shuffle(train)
    if train_size is not None:
        _check_size("data.train_size", train_size, len(train))
        train = train[:train_size]
    return [_analogy_record(q) for q in train], [_analogy_record(q) for q in evals]


def polarity_split(seed: int = 0, eval_size: int = 800, train_size: int | None = None) -> tuple[list[dict], list[dict]]:
    """Pang & Lee movie-review sentences as {"text", "label"} (1 = positive), both splits class-balanced."""
    rng = random.Random(seed)
    rows = _polarity_rows()
    by_label = [[r for r in rows if r["label"] == y] for y in (0, 1)]
    for group in by_label:
        rng.shuffle(group)
    # Alternate the classes, so that every prefix (eval first, then train) is balanced to within one.
    interleaved = [r for both in zip(*by_label) for r in both]
    _check_size("data.eval_size", eval_size, len(interleaved))
    evals, train = interleaved[:eval_size], interleaved[eval_size:]
    if train_size is not None:
        _check_size("data.train_size", train_size, len(train))
        train = train[:train_size]
    rng.shuffle(evals)
    rng.shuffle(train)
    return train, evals


TASKS = {
    "analogy": TaskSpec("analogy", "generation", analogy_split, "exact_match", None),
    "polarity": TaskSpec("polarity", "classification", polarity_split, "accuracy", ("negative", "positive")),
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ConfigError("data.task", name, ", ".join(sorted(TASKS)))
    return TASKS[name]


def _analogy_questions() -> list[tuple[str, str, str, str]]:
    """(a, b, c, d) for every semantic question "a is to b as c is to d", in file order."""
    questions, section = [], None
    for line in analogies_file().read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            section = line[1:].strip()
        elif section in SEMANTIC_SECTIONS and line.strip():
            questions.append(tuple(line.split()))
    return questions


def _analogy_record(q: tuple[str, str, str, str]) -> dict:
    a, b, c, d = q
    # The instruction as the system turn: it replaces SmolLM2's ~20-token default system prompt, which roughly
    # halves the sequence length (and the step time) and states the one-word answer format up front.
    return {"system": ANALOGY_INSTRUCTION, "instruction": f"{a} is to {b} as {c} is to", "output": d}


def _polarity_rows() -> list[dict]:
    text = polarity_file().read_text(encoding="utf-8-sig")
    label = {"1": 1, "-1": 0}
    # The sentences come lower-cased and tokenised ("the rock is destined ... ."), with a trailing newline.
    return [{"text": t.strip(), "label": label[y]} for y, t in csv.reader(io.StringIO(text))]


def _check_size(key: str, value: int, available: int) -> None:
    if not 0 < value <= available:
        raise ConfigError(key, value, f"1..{available}", "that many examples are available for this split")


def task_for(cfg):
    """The bundled task the recipe names, which must suit model.task_type."""
    task = get_task(cfg.data.task)
    expected = "seq_cls" if task.kind == "classification" else "causal_lm"
    if cfg.model.task_type != expected:
        raise ConfigError("data.task", cfg.data.task, f"a task for model.task_type {cfg.model.task_type!r}",
                          f"{cfg.data.task} is a {task.kind} task: set model.task_type: {expected}")
    return task
