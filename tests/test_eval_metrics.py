"""eval.metrics: choice scored against an independent computation, the user-function metric, the defaults, clear
errors for bad values, and the harmless-warning filter (drops the known lines, keeps errors)."""

import logging
import sys
import warnings

import pytest
import torch

from flexrank import log_filters
from flexrank.config import load_config
from flexrank.errors import ConfigError
from flexrank.evaluation.metrics import evaluate_task, label_set, resolve
from flexrank.evaluation.scoring import choose_answers

LABELS = ["yes", "no", "maybe so"]  # answers of different token lengths: padding must not count
RECORDS = [{"instruction": "Is it raining?", "input": f"Case {i}: the sky is {s}.", "output": LABELS[i % 3]}
           for i, s in enumerate(["grey", "blue", "dark", "clear", "cloudy", "red", "white"])]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


def _answer_logprob(model, tok, record, answer) -> float:
    """log p(answer turn | prompt), one unpadded sequence: the answer's tokens and the template's end of turn."""
    user = record["instruction"] + "\n\n" + record["input"]
    prompt = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
    full = tok.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": answer}])
    prompt, full = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt), \
        list(full["input_ids"] if hasattr(full, "keys") else full)
    assert full[: len(prompt)] == prompt
    end = full.index(tok.convert_tokens_to_ids("<|im_end|>"), len(prompt)) + 1  # end of the assistant turn
    with torch.no_grad():
        logprobs = model(torch.tensor([full[:end]])).logits[0].log_softmax(-1)
    return sum(logprobs[t - 1, full[t]].item() for t in range(len(prompt), end))


def test_choice_matches_independent_scoring(model_and_tokenizer):
    model, tok = model_and_tokenizer
    expected = [max(LABELS, key=lambda a: _answer_logprob(model, tok, r, a)) for r in RECORDS]
    assert choose_answers(model, tok, RECORDS, LABELS, batch_size=4) == expected  # 21 pairs: padded batches
    result = evaluate_task(model, tok, RECORDS, [], None, ["choice"], labels=LABELS, batch_size=4)
    assert result["choice"] == sum(e == r["output"] for e, r in zip(expected, RECORDS)) / len(RECORDS)


def test_label_set_from_data_merges_normalised_duplicates():
    records = [{"instruction": "q", "output": o} for o in ["Yes.", "no", "yes", "No", "maybe"]]
    assert label_set(None, records) == ["Yes.", "no", "maybe"]
    assert label_set(["a", "b"], records) == ["a", "b"]


def test_user_function_metric(model_and_tokenizer, tmp_path, monkeypatch):
    model, tok = model_and_tokenizer
    (tmp_path / "my_metrics.py").write_text(
        "seen = []\n"
        "def counts(preds, refs):\n    seen.append((list(preds), list(refs)))\n"
        "    return {'n_refs': len(refs), 'ref_chars': sum(map(len, refs))}\n"
        "def first_ref_len(preds, refs):\n    return len(refs[0])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(raw={"eval": {"metrics": ["my_metrics:counts", "my_metrics:first_ref_len"]}})
    result = evaluate_task(model, tok, RECORDS, [], None, cfg.eval.metrics, batch_size=3, max_new_tokens=2)
    refs = [r["output"] for r in RECORDS]
    assert result["n_refs"] == 7 and result["ref_chars"] == sum(map(len, refs))
    assert result["first_ref_len"] == len(refs[0])
    preds, seen_refs = sys.modules["my_metrics"].seen[0]
    assert seen_refs == refs and len(preds) == len(refs) and all(isinstance(p, str) for p in preds)


def test_default_metrics(model_and_tokenizer):
    _, tok = model_and_tokenizer
    short = [{"instruction": "q", "output": "yes"}]
    long = [{"instruction": "q", "output": "a long answer " * 10}]
    assert resolve("auto", "generation", False, short, tok, 8) == ["loss", "exact_match"]
    assert resolve("auto", "generation", False, long, tok, 8) == ["loss"]
    assert resolve("auto", "generation", True, long, tok, 8) == ["loss", "exact_match"]  # bundled tasks as before
    assert resolve("auto", "text", False, short, tok, 8) == ["loss"]
    with pytest.raises(ConfigError, match="eval.metrics"):
        resolve(["choice"], "text", False, short, tok, 8)


@pytest.mark.parametrize("value, fragment", [
    (["loss", "accuracy"], "'accuracy'"),
    ("bleu", "'bleu'"),
    ([], "[]"),
    (["no_such_module_xyz:f"], "no_such_module_xyz"),
    (["loss", "loss"], "each metric once"),
])
def test_bad_metrics_name_key_value_and_allowed(value, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(raw={"eval": {"metrics": value}})
    message = str(err.value)
    assert message.startswith("eval.metrics: got ") and fragment in message
    assert "loss, exact_match, choice, package.module:function" in message or "importable" in message \
        or "once" in message


def test_harmless_warning_filter_drops_known_lines_keeps_errors():
    log_filters.install()
    log_filters.install()  # idempotent: one filter per logger
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    for name in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
        logger = logging.getLogger(name)
        assert sum(isinstance(f, log_filters.HarmlessLineFilter) for f in logger.filters) == 1
        logger.addHandler(handler)
    try:
        logging.getLogger("torchao").warning("Failed to load /x/torchao/_C_mxfp8.abi3.so: Could not load this library")
        logging.getLogger("torch.utils._pytree").warning("<enum 'KernelPreference'> is an Enum subclass and is now "
                                                         "natively supported by torch.compile as an opaque value type.")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
        logging.getLogger("torchao").error("Failed to load /x/torchao/_C_mxfp8.abi3.so: segfault")  # an error: kept
        logging.getLogger("torchao").warning("quantization config is invalid")  # not a known line: kept
    finally:
        for name in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
            logging.getLogger(name).removeHandler(handler)
    assert seen == ["Failed to load /x/torchao/_C_mxfp8.abi3.so: segfault", "quantization config is invalid"]

    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        log_filters.install()
        warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "  # DeepSpeed, every step
                      "`torch.distributed.reduce_scatter_single` instead.", FutureWarning)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("this one matters", UserWarning)
    assert [str(w.message) for w in caught] == ["this one matters"]


# Prompts of clearly different lengths (left padding in one batch) and labels of different token lengths.
UNEVEN = [{"instruction": "Is it raining?", "input": "the sky " + "looks very grey " * n, "output": LABELS[n % 3]}
          for n in (0, 7, 2, 11, 1)]


def _peft_model(tiny_llama_dir):
    """A LoRA-wrapped tiny model whose adapter changes the outputs (B not zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "peft"])
def test_prompt_sharing_choice_equals_full_sequence_scoring(model_and_tokenizer, tiny_llama_dir, wrapped):
    """One forward of the prompts, the labels from their cached keys/values: the same scores as one unpadded
    forward per (record, label), and so the same choices (checked to be untied)."""
    from flexrank.evaluation.scoring import choice_scores

    model, tok = model_and_tokenizer
    if wrapped:
        model = _peft_model(tiny_llama_dir)
    expected = [[_answer_logprob(model, tok, r, a) for a in LABELS] for r in UNEVEN]
    scores = choice_scores(model, tok, UNEVEN, LABELS, batch_size=6)  # 2 records per batch: 3 batches, one short
    for got, want in zip(scores, expected):
        assert got == pytest.approx(want, abs=2e-4)
        ranked = sorted(want, reverse=True)
        assert ranked[0] - ranked[1] > 1e-2  # not tied: the choice is decided by the scores
    assert choose_answers(model, tok, UNEVEN, LABELS, batch_size=6) == \
        [LABELS[max(range(3), key=row.__getitem__)] for row in expected]


def _chat_ids(tok, messages, **kw) -> list[int]:
    ids = tok.apply_chat_template(messages, **kw)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("truncation", ["left", "middle"])
def test_evaluation_inputs_are_cut_like_training(model_and_tokenizer, truncation):
    """An over-long held-out prompt: choice keeps every label whole and cuts the prompt as training cuts the record
    with its longest label; generation cuts it so that max_new_tokens fit; a short one is left alone."""
    from flexrank.data.records import TRUNCATED, tokenize_records
    from flexrank.evaluation.scoring import Limits, choice_items, generation_prompts, with_answer

    _, tok = model_and_tokenizer
    long = {"instruction": "Is it raining?", "input": "the sky looks grey " * 30, "output": "yes"}
    short = {"instruction": "Is it raining?", "input": "no", "output": "no"}
    limits = Limits(max_length=48, truncation=truncation, min_prompt_length=4)
    user = [{"role": "user", "content": long["instruction"] + "\n\n" + long["input"]}]
    prompt = _chat_ids(tok, user, add_generation_prompt=True)
    fulls = [_chat_ids(tok, user + [{"role": "assistant", "content": a}]) for a in LABELS]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    answers = [f[len(prompt):f.index(end, len(prompt)) + 1] for f in fulls]  # answer + end of turn, whole
    longest = max(range(3), key=lambda j: len(fulls[j]))

    item, fitting = choice_items(tok, [long, short], LABELS, limits)
    assert item.answers == answers and item.status == TRUNCATED
    trained, status = tokenize_records(tok, [with_answer(long, LABELS[longest])], 48, truncation=truncation,
                                       min_prompt_length=4)[0]
    assert status == TRUNCATED and len(trained["input_ids"]) == 48
    tail = len(fulls[longest]) - len(prompt)
    assert item.prompt == trained["input_ids"][:48 - tail]  # the prompt training kept beside the longest label
    assert fitting.status != TRUNCATED and fitting.prompt == _chat_ids(
        tok, [{"role": "user", "content": "Is it raining?\n\nno"}], add_generation_prompt=True)

    (cut, status), (kept, kept_status) = generation_prompts(tok, [long, short], limits, max_new_tokens=8)
    room = 48 - 8
    assert status == TRUNCATED and len(cut) == room
    assert cut == (prompt[-room:] if truncation == "left" else prompt[:room // 2] + prompt[-(room - room // 2):])
    assert kept_status != TRUNCATED and len(kept) < room


def test_eval_length_limit_keys(tmp_path):
    cfg = load_config(raw={"data": {"max_length": 96, "truncation": "middle"}})
    assert cfg.eval_data().max_length == 96 and cfg.eval.gather_parameters == "auto"
    cfg = load_config(raw={"data": {"max_length": 96}, "eval": {"max_length": 4096, "gather_parameters": False}})
    assert cfg.eval_data().max_length == 4096 and cfg.data.max_length == 96 and cfg.eval.gather_parameters is False
    for key, value in (("max_length", 0), ("gather_parameters", "sometimes")):
        with pytest.raises(ConfigError) as err:
            load_config(raw={"eval": {key: value}})
        assert str(err.value).startswith(f"eval.{key}: got ")


def test_summary_line_says_how_many_prompts_were_cut():
    from flexrank.evaluation.metrics import summary_line

    line = summary_line({"choice": 0.5, "loss": 1.0, "perplexity": 2.7, "n": 10, "max_length": 192,
                         "truncated": 3, "dropped": 1, "seconds": 2.0})
    assert line == ("choice=0.5000, loss=1.0000, perplexity=2.7000 (10 records, 3 prompts truncated to 192 tokens, "
                    "1 too long for the loss, 2.0 s)")
