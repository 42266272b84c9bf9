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
