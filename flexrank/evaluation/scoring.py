"""Task metrics before and after training, computed with plain forward/generate calls (no Trainer needed).

Every pass takes a Shard (eval_shard.py): on several processes each runs its share of the batches and the results
are gathered, so the numbers are those of one process. One progress bar per evaluation, on the main process."""

import math
import unicodedata
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.records import (
    IGNORE_INDEX,
    encode_chat_text,
    generation_prompt,
    make_collator,
    pad_token_id,
    reference_answer,
    to_messages,
    tokenize_classification,
    tokenize_record,
)
from ..checkpoints.preemption import stop_if_signalled
from .sharding import Shard

_NO_TRUNCATION = 1 << 30


def exact_match(preds: list[str], refs: list[str]) -> float:
    """Share of predictions equal to the reference after normalisation (see normalise)."""
    _check_lengths(preds, refs)
    return sum(normalise(p) == normalise(r) for p, r in zip(preds, refs)) / len(refs)


def accuracy(preds: list, refs: list) -> float:
    _check_lengths(preds, refs)
    return sum(p == r for p, r in zip(preds, refs)) / len(refs)


def progress_bar(total: int, shard: Shard, desc: str = "eval", show: bool = True):
    """The one bar of an evaluation phase: main process only, gone when done (the summary line stays)."""
    return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=not show or shard.rank != 0)


def batches_of(n_items: int, batch_size: int, shard: Shard) -> int:
    return len(shard.batch_slices(n_items, batch_size))


def _sharded(items, batch_size: int, shard: Shard, progress, fn) -> list:
    """fn(list of items) over this process's batches (padding forwards dropped), gathered in batch order."""
    results = []
    for part in shard.batch_slices(len(items), batch_size):
        stop_if_signalled(together=shard.world > 1)  # preemption: every process of the shard stops at this batch
        chosen = range(len(items))[part if part is not None else slice(0, batch_size)]
        out = fn([items[i] for i in chosen])
        if part is not None:
            results.append(out)
        if progress is not None:
            progress.update(1)
    return shard.gather(results)


@torch.no_grad()
def generate_answers(model, tokenizer, records: list[dict], batch_size: int = 32, max_new_tokens: int = 8,
                     shard: Shard = Shard(), progress=None) -> list[str]:
    """Greedy generation for each record's prompt (up to its last assistant turn), decoded."""
    prompts = [encode_chat_text(tokenizer, generation_prompt(tokenizer, r)) for r in records]
    pad_id, device = pad_token_id(tokenizer), _device(model)

    def generate(batch: list[list[int]]) -> list[str]:
        width = max(map(len, batch))
        # Left padding: every prompt then ends in the last column, where generation continues.
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_id,
                             # several processes step together until all are done (ZeRO-3 / FSDP2 forwards
                             # are collectives; harmless under DDP)
                             synced_gpus=shard.lockstep)
        return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)

    with _eval_mode(model):
        return [p for batch in _sharded(prompts, batch_size, shard, progress, generate) for p in batch]


def evaluate_generation(model, tokenizer, records: list[dict], batch_size: int = 32, max_new_tokens: int = 8,
                        shard: Shard = Shard(), progress=None) -> dict:
    """Greedy generation for each record's prompt, scored by exact match against its last assistant turn."""
    preds = generate_answers(model, tokenizer, records, batch_size, max_new_tokens, shard, progress)
    return {**exact_match_report(preds, records), "n": len(records)}


def exact_match_report(preds: list[str], records: list[dict]) -> dict:
    """Exact match of the predictions against the records' last assistant turns, with the first five shown."""
    refs = [reference_answer(r) for r in records]
    examples = [{"input": _shown_input(r), "pred": p, "ref": ref} for r, p, ref in zip(records[:5], preds, refs)]
    return {"exact_match": exact_match(preds, refs), "examples": examples}


@torch.no_grad()
def choose_answers(model, tokenizer, records: list[dict], labels: list[str], batch_size: int = 32,
                   shard: Shard = Shard(), progress=None) -> list[str]:
    """For each record, the label whose tokens (the assistant turn with that answer, end of turn included) have
    the highest summed log-likelihood after the prompt: a closed-set answer without generation."""
    pairs = [tokenize_record(tokenizer, with_answer(r, label), _NO_TRUNCATION) for r in records for label in labels]
    collate, device = make_collator(tokenizer, False), _device(model)

    def score(batch: list[dict]) -> list[float]:
        inputs = {k: v.to(device) for k, v in collate(batch).items()}
        targets = inputs.pop("labels")[:, 1:]
        logprobs = model(**inputs).logits[:, :-1].float().log_softmax(-1)
        picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * (targets != IGNORE_INDEX)).sum(-1).tolist()

    with _eval_mode(model):
        scores = [s for batch in _sharded(pairs, batch_size, shard, progress, score) for s in batch]
    k = len(labels)
    return [labels[max(range(k), key=lambda j: scores[i * k + j])] for i in range(len(records))]


def with_answer(record: dict, answer: str) -> dict:
    """The record as a chat that ends with `answer` as its last assistant turn."""
    messages = to_messages(record)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"messages": [*messages[:last], {"role": "assistant", "content": answer}]}


@torch.no_grad()
def evaluate_classification(model, tokenizer, records: list[dict], batch_size: int = 64, max_length: int = 128,
                            shard: Shard = Shard(), progress=None) -> dict:
    """Accuracy of argmax(logits) for a sequence-classification model (decoders need config.pad_token_id set)."""
    items = [tokenize_classification(tokenizer, r, max_length) for r in records]
    collate, device = make_collator(tokenizer, False), _device(model)

    def classify(batch: list[dict]) -> list[int]:
        inputs = collate(batch)
        inputs.pop("labels")
        return model(**{k: v.to(device) for k, v in inputs.items()}).logits.argmax(-1).tolist()

    with _eval_mode(model):
        preds = [p for batch in _sharded(items, batch_size, shard, progress, classify) for p in batch]
    return {"accuracy": accuracy(preds, [int(r["label"]) for r in records]), "n": len(records)}


@torch.no_grad()
def evaluate_loss(model, dataset, collator, batch_size: int = 8, shard: Shard = Shard(), progress=None) -> dict:
    """Mean next-token loss over all labelled tokens of the dataset (token-weighted, not batch-weighted)."""
    device = _device(model)

    def loss_sum(batch: list[dict]) -> tuple[float, int]:
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(batch).items()}  # packed: use_cache
        targets = inputs.pop("labels")[:, 1:]  # position t predicts token t+1
        logits = model(**inputs).logits[:, :-1].float()
        total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return total.item(), int((targets != IGNORE_INDEX).sum())

    with _eval_mode(model):
        parts = _sharded(dataset, batch_size, shard, progress, loss_sum)
    total, tokens = sum(p[0] for p in parts), sum(p[1] for p in parts)  # batch order: as on one process
    if tokens == 0:
        raise ValueError("no labelled tokens to evaluate the loss on")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": tokens}


def normalise(text: str) -> str:
    """First line, without surrounding space or trailing punctuation, case-folded: "Paris.\\n" == "paris"."""
    lines = text.strip().splitlines()
    text = lines[0].strip() if lines else ""
    while text and unicodedata.category(text[-1]).startswith("P"):
        text = text[:-1].rstrip()
    return text.casefold()


def _check_lengths(preds: list, refs: list) -> None:
    if len(preds) != len(refs) or not refs:
        raise ValueError(f"need as many predictions as references, and at least one: {len(preds)} vs {len(refs)}")


def _shown_input(record: dict) -> str:
    """The varying part of the prompt, for the examples in the report (an Alpaca input, or the last user turn)."""
    if record.get("input"):
        return record["input"]
    users = [m["content"] for m in to_messages(record) if m["role"] == "user"]
    return users[-1] if users else ""


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(model):
    """model.eval() for the block, then back to the mode it was in (evaluation may run mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
