"""Task metrics before and after training, computed with plain forward/generate calls (no Trainer needed).

Every pass takes a Shard (eval_shard.py): on several processes each runs its share of the batches and the results
are gathered, so the numbers are those of one process. One progress bar per evaluation, on the main process."""

import inspect
import math
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.records import (
    FITS,
    IGNORE_INDEX,
    cut_prompt,
    encode_chat_text,
    generation_prompt,
    make_collator,
    pad_token_id,
    reference_answer,
    to_messages,
    tokenize_classification,
    tokenize_records,
)
from ..checkpoints.preemption import Preempted, agreed_signal
from .sharding import Shard

_NO_TRUNCATION = 1 << 30


@dataclass(frozen=True)
class Limits:
    """The length limits evaluation inputs are cut to: the training's (data.max_length, truncation,
    min_prompt_length) unless eval.max_length says otherwise; max_length None: no limit."""
    max_length: int | None = None
    truncation: str = "left"
    min_prompt_length: int = 0

    def cut(self, prompt: list[int], answer_room: int) -> tuple[list[int], int]:
        """(prompt, FITS | TRUNCATED) with room left for answer_room tokens after it, as training cuts prompts."""
        if self.max_length is None:
            return prompt, FITS
        return cut_prompt(prompt, self.max_length - answer_room, self.truncation, self.min_prompt_length)


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
    results, signum = [], 0
    for part in shard.batch_slices(len(items), batch_size):
        # Preemption: in lockstep every process runs as many batches, so they agree at each one and stop together;
        # with local forwards they may run different numbers, so each stops at its next batch and they agree once,
        # below, where all of them arrive.
        signum = agreed_signal(together=shard.lockstep)
        if signum:
            break
        chosen = range(len(items))[part if part is not None else slice(0, batch_size)]
        out = fn([items[i] for i in chosen])
        if part is not None:
            results.append(out)
        if progress is not None:
            progress.update(1)
    if shard.world > 1 and not shard.lockstep:
        signum = agreed_signal(together=True)
    if signum:
        raise Preempted(signum, "during an evaluation")
    return shard.gather(results)


def generation_prompts(tokenizer, records: list[dict], limits: Limits,
                       max_new_tokens: int) -> list[tuple[list[int], int]]:
    """(prompt tokens, FITS | TRUNCATED) per record: cut so that the prompt and max_new_tokens fit the limit."""
    return [limits.cut(encode_chat_text(tokenizer, generation_prompt(tokenizer, r)), max_new_tokens) for r in records]


@torch.no_grad()
def generate_answers(model, tokenizer, records: list[dict], batch_size: int = 32, max_new_tokens: int = 8,
                     shard: Shard = Shard(), progress=None, limits: Limits = Limits()) -> list[str]:
    """Greedy generation for each record's prompt (up to its last assistant turn, cut to the limits), decoded."""
    prompts = [p for p, _ in generation_prompts(tokenizer, records, limits, max_new_tokens)]
    pad_id, device = pad_token_id(tokenizer), _device(model)

    def generate(batch: list[list[int]]) -> list[str]:
        input_ids, attention_mask = _left_padded(batch, pad_id, device)  # every prompt ends in the last column
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_id,
                             # sharded weights: every forward is a collective, so the processes step together
                             # until all are done
                             synced_gpus=shard.lockstep)
        return tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)

    with _eval_mode(model):
        return [p for batch in _sharded(prompts, batch_size, shard, progress, generate) for p in batch]


def evaluate_generation(model, tokenizer, records: list[dict], batch_size: int = 32, max_new_tokens: int = 8,
                        shard: Shard = Shard(), progress=None, limits: Limits = Limits()) -> dict:
    """Greedy generation for each record's prompt, scored by exact match against its last assistant turn."""
    preds = generate_answers(model, tokenizer, records, batch_size, max_new_tokens, shard, progress, limits)
    return {**exact_match_report(preds, records), "n": len(records)}


def exact_match_report(preds: list[str], records: list[dict]) -> dict:
    """Exact match of the predictions against the records' last assistant turns, with the first five shown."""
    refs = [reference_answer(r) for r in records]
    examples = [{"input": _shown_input(r), "pred": p, "ref": ref} for r, p, ref in zip(records[:5], preds, refs)]
    return {"exact_match": exact_match(preds, refs), "examples": examples}


@dataclass(frozen=True)
class ChoiceItem:
    """One record's choice inputs: its prompt (cut so that its longest label fits the limit) and, per label, the
    tokens after the prompt that are scored: the answer and the end of its turn."""
    prompt: list[int]
    answers: list[list[int]]
    status: int  # FITS | TRUNCATED


def choice_items(tokenizer, records: list[dict], labels: list[str], limits: Limits = Limits()) -> list[ChoiceItem]:
    """Each record with every label as its answer, tokenized as training tokenizes (tokenize_records, which checks
    that the prompt's tokens are a prefix of the whole conversation's, so every label continues the same prompt)."""
    k = len(labels)
    full = tokenize_records(tokenizer, [with_answer(r, label) for r in records for label in labels], _NO_TRUNCATION)
    items = []
    for i, record in enumerate(records):
        prompt = encode_chat_text(tokenizer, generation_prompt(tokenizer, record))
        rows = [tokens for tokens, _ in full[i * k:(i + 1) * k]]
        answers = [row["input_ids"][len(prompt):_answer_end(row["labels"])] for row in rows]
        # training keeps the whole rest of the conversation (end-of-turn layout included) after a cut prompt
        tail = max(len(row["input_ids"]) for row in rows) - len(prompt)
        cut, status = limits.cut(prompt, tail)
        items.append(ChoiceItem(cut, answers, status))
    return items


def choice_records_per_batch(batch_size: int, n_labels: int) -> int:
    """Records per choice batch: their labels' continuations make one forward of at most batch_size rows."""
    return max(1, batch_size // n_labels)


def choose_answers(model, tokenizer, records: list[dict], labels: list[str], batch_size: int = 32,
                   shard: Shard = Shard(), progress=None, limits: Limits = Limits()) -> list[str]:
    """For each record, the label whose tokens (the assistant turn with that answer, end of turn included) have
    the highest summed log-likelihood after the prompt: a closed-set answer without generation."""
    scores = choice_scores(model, tokenizer, records, labels, batch_size, shard, progress, limits)
    return [labels[max(range(len(labels)), key=row.__getitem__)] for row in scores]


@torch.no_grad()
def choice_scores(model, tokenizer, records: list[dict], labels: list[str], batch_size: int = 32,
                  shard: Shard = Shard(), progress=None, limits: Limits = Limits()) -> list[list[float]]:
    """Per record, each label's summed log-likelihood as the answer after the record's prompt."""
    items = choice_items(tokenizer, records, labels, limits)
    per_batch = choice_records_per_batch(batch_size, len(labels))
    score = _prompt_sharing_scorer(model, pad_token_id(tokenizer), len(labels))
    with _eval_mode(model):
        return [row for batch in _sharded(items, per_batch, shard, progress, score) for row in batch]


def _prompt_sharing_scorer(model, pad_id: int, k: int):
    """Scores of a batch of ChoiceItems, two forwards whatever k: the prompts once, then all k labels of every
    record as continuations of its cached keys/values (the cache repeated k times)."""
    device, cache_name = _device(model), _cache_argument(model)

    def score(batch: list[ChoiceItem]) -> list[list[float]]:
        ids, mask = _left_padded([it.prompt for it in batch], pad_id, device)
        # explicit positions: left padding must not shift the prompt's positions (rotary embeddings)
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True, logits_to_keep=1)  # only the last position's logits are used
        first = out.logits[:, -1].float().log_softmax(-1).repeat_interleave(k, 0)  # predicts each answer's 1st token
        cache = out[cache_name]
        cache.batch_repeat_interleave(k)
        answers = [a for it in batch for a in it.answers]
        cont, cont_mask = _right_padded(answers, pad_id, device)
        lengths = mask.sum(-1).repeat_interleave(k)
        positions = lengths[:, None] + torch.arange(cont.shape[1], device=device)
        logits = model(input_ids=cont, attention_mask=torch.cat([mask.repeat_interleave(k, 0), cont_mask], -1),
                       position_ids=positions, use_cache=True, **{cache_name: cache}).logits
        rest = logits[:, :-1].float().log_softmax(-1).gather(-1, cont[:, 1:, None]).squeeze(-1)
        picked = torch.cat([first.gather(-1, cont[:, :1]), rest], 1) * cont_mask
        return picked.sum(-1).view(len(batch), k).tolist()

    return score


def _cache_argument(model) -> str:
    """The name of a causal LM's key/value cache, in and out of forward: transformers 5.2x renamed
    past_key_values to cache (the old name still works, with a deprecation warning)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _answer_end(labels: list[int]) -> int:
    """Just after the last labelled token: the end of the last assistant turn (its end-of-turn token included)."""
    return max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1


def _left_padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def _right_padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


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
