"""Task metrics before and after training, computed with plain forward/generate calls (no Trainer needed)."""

import math
import unicodedata
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from flexrank.trainer.data import (
    IGNORE_INDEX,
    encode_chat_text,
    generation_prompt,
    make_collator,
    pad_token_id,
    reference_answer,
    to_messages,
    tokenize_classification,
)


def exact_match(preds: list[str], refs: list[str]) -> float:
    """Share of predictions equal to the reference after normalisation (see _normalise)."""
    _check_lengths(preds, refs)
    return sum(_normalise(p) == _normalise(r) for p, r in zip(preds, refs)) / len(refs)


def accuracy(preds: list, refs: list) -> float:
    _check_lengths(preds, refs)
    return sum(p == r for p, r in zip(preds, refs)) / len(refs)


@torch.no_grad()
def evaluate_generation(model, tokenizer, records: list[dict], batch_size: int = 32, max_new_tokens: int = 8) -> dict:
    """Greedy generation for each record's prompt, scored by exact match against its last assistant turn."""
    prompts = [encode_chat_text(tokenizer, generation_prompt(tokenizer, r)) for r in records]
    pad_id, device = pad_token_id(tokenizer), _device(model)
    preds = []
    with _eval_mode(model):
        for start in tqdm(range(0, len(prompts), batch_size), desc="eval: generate", unit="batch", leave=False):
            batch = prompts[start : start + batch_size]
            width = max(map(len, batch))
            # Left padding: every prompt then ends in the last column, where generation continues.
            input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
            preds += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    refs = [reference_answer(r) for r in records]
    examples = [{"input": _shown_input(r), "pred": p, "ref": ref} for r, p, ref in zip(records[:5], preds, refs)]
    return {"exact_match": exact_match(preds, refs), "n": len(records), "examples": examples}


@torch.no_grad()
def evaluate_classification(model, tokenizer, records: list[dict], batch_size: int = 64, max_length: int = 128) -> dict:
    """Accuracy of argmax(logits) for a sequence-classification model (decoders need config.pad_token_id set)."""
    items = [tokenize_classification(tokenizer, r, max_length) for r in records]
    loader = DataLoader(items, batch_size=batch_size, collate_fn=make_collator(tokenizer, packing=False))
    device, preds = _device(model), []
    with _eval_mode(model):
        for batch in tqdm(loader, desc="eval: classify", unit="batch", leave=False):
            batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            preds += logits.argmax(-1).tolist()
    return {"accuracy": accuracy(preds, [int(r["label"]) for r in records]), "n": len(records)}


@torch.no_grad()
def evaluate_loss(model, dataset, collator, batch_size: int = 8) -> dict:
    """Mean next-token loss over all labelled tokens of the dataset (token-weighted, not batch-weighted)."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    device, total, tokens = _device(model), 0.0, 0
    with _eval_mode(model):
        for batch in tqdm(loader, desc="eval: loss", unit="batch", leave=False):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}  # packed: use_cache
            targets = batch.pop("labels")[:, 1:]  # position t predicts token t+1
            logits = model(**batch).logits[:, :-1].float()
            total += F.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            tokens += (targets != IGNORE_INDEX).sum().item()
    if tokens == 0:
        raise ValueError("no labelled tokens to evaluate the loss on")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": tokens}


def _normalise(text: str) -> str:
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
