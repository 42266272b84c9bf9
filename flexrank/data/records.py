"""User records (Alpaca, chat, plain text, classification) -> token ids, labels and padded/packed batches."""

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from transformers import DataCollatorWithFlattening

from .sources import SOURCE_HELP as _RECORD_HELP
from ..errors import ConfigError

FORMATS = ("auto", "alpaca", "chat", "text")
TRUNCATION = ("left", "middle")  # which part of an over-long prompt goes; the response is kept
FITS, TRUNCATED, DROPPED = 0, 1, 2  # what truncation did to a record
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # the label value that torch's cross-entropy (and so every HF loss) skips
_REQUIRED = {"alpaca": ("instruction", "output"), "chat": ("messages",), "text": ("text",)}


def load_records(path, fmt: str = "auto", columns: dict | None = None, key: str = "data.path") -> list[dict]:
    """Read and validate every record, so a bad file fails before any model is loaded."""
    from .sources import Source, read_source

    ds = read_source(Source(str(path), key=key, columns=dict(columns or {})))
    return list(validated_records(ds, fmt, key, str(path)))


def validated_records(ds, fmt: str, key: str, path: str):
    """The Dataset's rows as record dicts (null fields dropped), each checked for `fmt` ("auto": the first record's)."""
    if fmt not in FORMATS:
        raise ConfigError("data.format", fmt, ", ".join(FORMATS))
    if len(ds) == 0:
        raise ConfigError(key, path, _RECORD_HELP, "the file holds no records")
    i = 0
    for batch in ds.iter(batch_size=4096):
        for record in records_of_batch(batch):
            if fmt == "auto":
                # One format per file, taken from the first record, so that a later record missing a key is
                # reported as such rather than silently read as another format.
                fmt = record_format(record)
                if fmt is None:
                    raise ConfigError(key, path, _RECORD_HELP, f"record 0: cannot tell the format from {sorted(record)}")
            problem = _problem(record, fmt)
            if problem:
                raise ConfigError(key, path, _RECORD_HELP, f"record {i} ({fmt}): {problem}")
            i += 1
            yield record


def records_of_batch(batch: dict) -> list[dict]:
    """A columnar batch as record dicts; Arrow fills a key a record lacks with null, so nulls are dropped again."""
    keys = list(batch)
    return [drop_nulls(dict(zip(keys, values))) for values in zip(*(batch[k] for k in keys))]


def drop_nulls(value):
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def record_format(record) -> str | None:
    """'alpaca', 'chat' or 'text' from the record's keys; None when it is none of them."""
    if not isinstance(record, dict):
        return None
    return next((fmt for fmt, keys in _REQUIRED.items() if all(k in record for k in keys)), None)


def to_messages(record: dict) -> list[dict]:
    """The record as a chat: an Alpaca record is an optional system turn, one user turn and one assistant turn."""
    if record_format(record) == "chat":
        return record["messages"]
    user = record["instruction"] + ("\n\n" + record["input"] if record.get("input") else "")
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return system + [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def reference_answer(record: dict) -> str:
    """What generation is scored against: the last assistant turn."""
    return to_messages(record)[_last_assistant(record)]["content"]


def generation_prompt(tokenizer, record: dict) -> str:
    """The conversation up to the last assistant turn, ending with the generation prompt."""
    return _render(tokenizer, to_messages(record)[: _last_assistant(record)], add_generation_prompt=True)


def tokenize_record(tokenizer, record: dict, max_length: int, response_only: bool = True, truncation: str = "left",
                    min_prompt_length: int = 0) -> dict | None:
    """{"input_ids", "labels"} for causal-LM training, at most max_length tokens; None if it cannot fit.

    With response_only, only the assistant turns are learned: every other token is labelled -100.
    See tokenize_with_status for how an over-long record is truncated.
    """
    return tokenize_with_status(tokenizer, record, max_length, response_only, truncation, min_prompt_length)[0]


def tokenize_with_status(tokenizer, record: dict, max_length: int, response_only: bool = True,
                         truncation: str = "left", min_prompt_length: int = 0) -> tuple[dict | None, int]:
    """(tokens or None, FITS | TRUNCATED | DROPPED) of one record; see tokenize_records."""
    return tokenize_records(tokenizer, [record], max_length, response_only, truncation, min_prompt_length)[0]


def tokenize_records(tokenizer, records: list[dict], max_length: int, response_only: bool = True,
                     truncation: str = "left", min_prompt_length: int = 0) -> list[tuple[dict | None, int]]:
    """(tokens or None, FITS | TRUNCATED | DROPPED) per record, the texts of all records encoded in one call.

    A conversation longer than max_length loses prompt tokens (everything before the last assistant turn), from
    the left or the middle, so that the response it is trained on survives whole. It is dropped when the response
    alone leaves fewer than min_prompt_length (at least 1) tokens for the prompt. Plain text keeps its start.
    """
    is_text = [record_format(r) == "text" for r in records]
    plans = [[] if text else _chat_texts(tokenizer, to_messages(r)) for r, text in zip(records, is_text)]
    texts = [t for plan in plans for t in plan]
    # A chat template writes its own special tokens (bos included); plain text and the fallback layout rely on the
    # tokenizer's (see encode_chat_text).
    chat_ids = iter(tokenizer(texts, add_special_tokens=not tokenizer.chat_template)["input_ids"] if texts else [])
    plain = [r["text"] for r, text in zip(records, is_text) if text]
    plain_ids = iter(tokenizer(plain)["input_ids"] if plain else [])
    out = []
    for record, plan, text in zip(records, plans, is_text):
        if text:
            out.append(_text_tokens(tokenizer, next(plain_ids), max_length))
        else:
            out.append(_chat_tokens(tokenizer, to_messages(record), [next(chat_ids) for _ in plan], max_length,
                                    response_only, truncation, min_prompt_length))
    return out


def _text_tokens(tokenizer, ids: list[int], max_length: int) -> tuple[dict, int]:
    if tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
        ids = ids + [tokenizer.eos_token_id]  # so the model learns where a document ends
    return {"input_ids": ids[:max_length], "labels": ids[:max_length]}, FITS if len(ids) <= max_length else TRUNCATED


def _chat_texts(tokenizer, messages: list[dict]) -> list[str]:
    """The texts whose tokens locate the labelled spans: the whole conversation, then for each assistant turn the
    conversation up to it (ending with the generation prompt) and, unless it is the last message, through it.

    Tokenizing the prefixes rather than searching for the answer's tokens makes the boundary exact for any
    template, as long as the template's tokenization is prefix-stable (checked in _chat_tokens).
    """
    texts = [_render(tokenizer, messages)]
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            texts.append(_render(tokenizer, messages[:i], add_generation_prompt=True))
            if i + 1 < len(messages):
                texts.append(_render(tokenizer, messages[: i + 1]))
    return texts


def _chat_tokens(tokenizer, messages: list[dict], encoded: list[list[int]], max_length: int, response_only: bool,
                 truncation: str, min_prompt_length: int) -> tuple[dict | None, int]:
    ids, prefixes = encoded[0], iter(encoded[1:])
    labels = [IGNORE_INDEX] * len(ids) if response_only else list(ids)
    start = None
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = _prefix_length(next(prefixes), ids, i, add_generation_prompt=True)
            turn = len(ids) if i + 1 == len(messages) else _prefix_length(next(prefixes), ids, i + 1)
            if response_only:
                end = _turn_end(tokenizer, ids, start, turn)
                labels[start:end] = ids[start:end]
    if len(ids) <= max_length:
        return {"input_ids": ids, "labels": labels}, FITS
    keep = max_length - (len(ids) - start)  # prompt tokens that fit beside the whole (last) response
    if keep < max(min_prompt_length, 1):
        return None, DROPPED
    kept = _kept_prompt(start, keep, truncation) + list(range(start, len(ids)))
    return {"input_ids": [ids[k] for k in kept], "labels": [labels[k] for k in kept]}, TRUNCATED


def _kept_prompt(length: int, keep: int, truncation: str) -> list[int]:
    """Positions of the `keep` prompt tokens (of `length`) that survive truncation."""
    if truncation == "left":
        return list(range(length - keep, length))
    # middle: the prompt's start (system prompt, instruction) and its end (next to the answer) survive
    head = keep // 2
    return list(range(head)) + list(range(length - (keep - head), length))


def cut_prompt(prompt: list[int], room: int, truncation: str = "left", min_prompt_length: int = 0) -> tuple[list[int], int]:
    """(tokens, FITS | TRUNCATED): a prompt cut to `room` tokens by the training's rule (tokenize_records), for
    evaluation inputs whose answer is not one fixed text (generation, a set of labels). Where training would drop
    the record, it keeps min_prompt_length (at least 1) tokens instead: every held-out record is answered."""
    keep = max(room, min_prompt_length, 1)
    if len(prompt) <= keep:
        return prompt, FITS
    return [prompt[k] for k in _kept_prompt(len(prompt), keep, truncation)], TRUNCATED


def tokenize_classification(tokenizer, record: dict, max_length: int) -> dict:
    enc = tokenizer(record["text"], truncation=True, max_length=max_length)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": int(record["label"])}


class TokenizedDataset(Dataset):
    """Tokenized dicts (a list, or an Arrow-backed datasets.Dataset from data_cache.py) as a plain torch Dataset:
    tokenizing once up front keeps the training loop free of text work, and the Trainer sees no HF columns."""

    def __init__(self, items):
        self.items = items if hasattr(items, "__getitem__") else list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


@dataclass
class PaddingCollator:
    """Right-pads a batch: input_ids with the pad id, labels with -100, plus the attention mask.

    A class rather than a closure so that DataLoader workers can pickle it.
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)

        def pad(seq, value):
            return list(seq) + [value] * (width - len(seq))

        batch = {
            "input_ids": torch.tensor([pad(f["input_ids"], self.pad_token_id) for f in features]),
            "attention_mask": torch.tensor([pad([1] * len(f["input_ids"]), 0) for f in features]),
        }
        if "labels" in features[0]:
            labels = [f["labels"] for f in features]
            # Token labels (causal LM) are padded; one class id per example (classification) is not.
            if isinstance(labels[0], list):
                labels = [pad(x, IGNORE_INDEX) for x in labels]
            batch["labels"] = torch.tensor(labels)
        return batch


class PackingCollator(DataCollatorWithFlattening):
    """Padding-free batches: the examples concatenated into one row, position_ids restarting at each.

    The attention keeps the examples apart. The batch carries their boundaries as `cu_seq_lens_q/k` (int32,
    cumulative lengths) and `max_length_q/k` (python ints), computed here on the CPU so the model needs no host sync
    to find them: flexrank's varlen attention and flash-attention run each example on its own with them; sdpa/eager
    ignore them and take a dense block-diagonal mask that transformers builds from the position_ids. The first
    label of each example is -100, so no loss crosses a boundary either.
    """

    def __init__(self, **kwargs):
        super().__init__(**{"return_flash_attn_kwargs": True, **kwargs})

    def __call__(self, features, return_tensors=None, separator_id=None):
        batch = super().__call__(features, return_tensors, separator_id)
        # transformers (5.x) builds the block-diagonal mask only when the forward has no KV cache, and a
        # model with config.use_cache=True makes one even in training: examples would then attend to each
        # other under sdpa/eager. Saying it in the batch makes every caller safe (see tests/test_data.py).
        batch["use_cache"] = False
        return batch


def make_collator(tokenizer, packing: bool):
    """The padding collator, or with packing the padding-free one (see PackingCollator)."""
    return PackingCollator() if packing else PaddingCollator(pad_token_id(tokenizer))


def pad_token_id(tokenizer) -> int:
    """The pad id, or eos for tokenizers without a pad token (padded positions are masked out anyway)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
    return pad_id


def encode_chat_text(tokenizer, text: str) -> list[int]:
    """Token ids of text laid out by the chat template (or the fallback layout), e.g. a generation_prompt."""
    # A chat template writes its own special tokens (bos included); the fallback layout relies on the tokenizer's.
    return tokenizer(text, add_special_tokens=not tokenizer.chat_template)["input_ids"]


def _problem(record, fmt: str) -> str | None:
    """What is wrong with one record for `fmt`, or None."""
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, not an object"
    missing = [k for k in _REQUIRED[fmt] if k not in record]
    if missing:
        return f"missing key {missing[0]!r}"
    if fmt == "alpaca":
        strings = isinstance(record["instruction"], str) and isinstance(record["output"], str)
        optional = all(isinstance(record.get(k) or "", str) for k in ("input", "system"))  # absent, "" or null
        if not strings or not optional:
            return "instruction and output must be strings, input and system strings or null"
    elif fmt == "text":
        if not isinstance(record["text"], str):
            return "text must be a string"
    else:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return "messages must be a non-empty list"
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return f"messages[{j}] must be {{role: {'|'.join(ROLES)}, content: string}}"
        if not any(m["role"] == "assistant" for m in messages):
            return "no assistant turn to learn from"
    return None


def _last_assistant(record: dict) -> int:
    messages = to_messages(record)
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # Base models have no template: a plain Alpaca-style layout, each assistant turn closed by eos.
    headers = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}
    eos = tokenizer.eos_token or ""
    blocks = [headers[m["role"]] + m["content"] + (eos if m["role"] == "assistant" else "") for m in messages]
    if add_generation_prompt:
        blocks.append(headers["assistant"])
    return "\n\n".join(blocks)


def _prefix_length(prefix: list[int], ids: list[int], n_messages: int, add_generation_prompt: bool = False) -> int:
    if ids[: len(prefix)] != prefix:
        raise ValueError(
            f"the chat template is not prefix-stable: the tokens of the first {n_messages} message(s)"
            f"{' plus the generation prompt' if add_generation_prompt else ''} are not a prefix of the whole"
            " conversation's tokens, so the prompt/response boundary for loss masking is unknown"
        )
    return len(prefix)


def _turn_end(tokenizer, ids: list[int], start: int, end: int) -> int:
    """End of the labelled span: just after the turn's last eos token, if it has one.

    Templates follow the end token with layout (ChatML: "<|im_end|>\\n"); the model must learn to emit the
    end token, not the layout after it.
    """
    eos = tokenizer.eos_token_id
    closing = [i for i in range(start, end) if ids[i] == eos]
    return closing[-1] + 1 if closing else end
