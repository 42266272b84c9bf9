"""User data through HF datasets: csv/parquet files with renamed columns train, a 200k-record file tokenizes once
and then loads from the cache, over-long prompts keep their answer, sources mix by weight, bad mappings are
clear errors. Uses SmolLM2's real tokenizer (via the tiny-llama fixture) and a tiny random Llama."""

import json
import time

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
import pytest
import yaml
from transformers import AutoTokenizer

from flexrank.data import cache, records as data_lib
from flexrank.checks import check_data
from flexrank.config import load_config
from flexrank.data.records import IGNORE_INDEX, encode_chat_text, generation_prompt, tokenize_with_status
from flexrank.data.pipeline import load_data, tokenize_train
from flexrank.errors import ConfigError
from flexrank.run import train

QUICK = {"learning_rate": 1e-2, "per_device_train_batch_size": 4, "max_steps": 2, "logging_steps": 1,
         "warmup_steps": 0, "report_to": []}


def qa_table(n: int, offset: int = 0) -> pa.Table:
    return pa.table({"question": [f"Add {i} and {i + 1}." for i in range(offset, offset + n)],
                     "answer": [str(2 * i + 1) for i in range(offset, offset + n)],
                     "source": ["synthetic"] * n})


def recipe(model_dir, out, **data):
    return load_config(raw={"model": {"name_or_path": str(model_dir)}, "data": data,
                            "eval": {"before": False, "batch_size": 8, "max_new_tokens": 2},
                            "training": {**QUICK, "output_dir": str(out)}})


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture()
def own_cache(tmp_path, monkeypatch):
    """A fresh flexrank cache, so that the first tokenization in the test really tokenizes."""
    monkeypatch.setenv("FLEXRANK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_renamed_columns_train(suffix, tiny_llama_dir, tmp_path, own_cache):
    path = tmp_path / f"qa.{suffix}"
    (pa.csv.write_csv if suffix == "csv" else pa.parquet.write_table)(qa_table(40), path)
    cfg = recipe(tiny_llama_dir, tmp_path / "run", path=str(path), eval_size=5,
                 columns={"instruction": "question", "output": "answer"})
    metrics = train(cfg)
    assert metrics["data"] == {"train": 35, "eval": 5}
    assert metrics["truncation"] == {"truncated": 0, "dropped": 0}
    assert len(metrics["train"]["losses"]) == 2 and metrics["after"]["loss"] > 0
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["truncation"] == metrics["truncation"]
    # The answers the run trained on are the file's `answer` column: the held-out records say so.
    held_out = load_data(cfg).eval
    answers = dict(zip(qa_table(40)["question"].to_pylist(), qa_table(40)["answer"].to_pylist()))
    assert all(r["output"] == answers[r["instruction"]] for r in held_out) and len(held_out) == 5


def test_large_file_tokenizes_once_then_loads_from_the_cache(tiny_llama_dir, tmp_path, own_cache, monkeypatch):
    n = 200_000
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Add {i} and {i + 1}.", "output": str(2 * i + 1)}) + "\n"
                            for i in range(n)))
    cfg = recipe(tiny_llama_dir, tmp_path / "run", path=str(path), eval_size=10, num_proc=2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    from datasets import Dataset

    calls = []
    real_map = Dataset.map
    monkeypatch.setattr(Dataset, "map", lambda self, *a, **k: calls.append(len(self)) or real_map(self, *a, **k))

    t0 = time.perf_counter()
    first = tokenize_train(cfg, tokenizer, load_data(cfg))
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = tokenize_train(cfg, tokenizer, load_data(cfg))
    t_second = time.perf_counter() - t0
    print(f"\n200k records: first run {t_first:.1f} s ({first.stats['records_per_s']:,.0f} records/s tokenizing), "
          f"second run {t_second:.1f} s (cache load {second.stats['load_seconds']:.2f} s)")
    assert calls == [n - 10]  # one map over the training records, none on the second run
    assert not first.stats["cached"] and second.stats["cached"]
    assert len(cache.entries("tokenized")) == 1  # (hidden: the in-use locks)
    assert len(first.dataset) == len(second.dataset) == n - 10
    # Spot-check against the per-record tokenization: the same records in the same order.
    order = load_data(cfg).train[0].records
    for i in (0, 12_345, n - 11):
        expected = data_lib.tokenize_record(tokenizer, order[i], 128)
        assert second.dataset[i] == expected


@pytest.mark.parametrize("truncation", ["left", "middle"])
def test_long_prompt_keeps_its_answer(truncation, tokenizer):
    record = {"instruction": "Summarise: " + " ".join(f"w{i}" for i in range(200)), "output": "A long list."}
    # Independently: the prompt is everything up to the generation prompt; the answer tokens follow it.
    prompt = encode_chat_text(tokenizer, generation_prompt(tokenizer, record))
    whole = encode_chat_text(tokenizer, tokenizer.apply_chat_template(
        [{"role": "user", "content": record["instruction"]}, {"role": "assistant", "content": "A long list."}],
        tokenize=False))
    answer = whole[len(prompt):]
    assert whole[: len(prompt)] == prompt and len(prompt) > 200
    max_length = 64
    keep = max_length - len(answer)
    kept_prompt = prompt[-keep:] if truncation == "left" else prompt[: keep // 2] + prompt[-(keep - keep // 2):]
    item, status = tokenize_with_status(tokenizer, record, max_length, truncation=truncation)
    assert status == data_lib.TRUNCATED
    assert item["input_ids"] == kept_prompt + answer
    answer_labels = answer[: answer.index(tokenizer.eos_token_id) + 1]  # the answer and its end token
    assert item["labels"] == [IGNORE_INDEX] * keep + answer_labels + [IGNORE_INDEX] * (len(answer) - len(answer_labels))
    assert tokenizer.decode(answer_labels) == "A long list.<|im_end|>"
    # An answer that leaves fewer than min_prompt_length tokens for the prompt: the record is dropped.
    assert tokenize_with_status(tokenizer, record, len(answer) + 3, min_prompt_length=4) == (None, data_lib.DROPPED)
    assert tokenize_with_status(tokenizer, record, len(answer) + 4, min_prompt_length=4)[1] == data_lib.TRUNCATED


def test_truncation_counts_reach_metrics(tiny_llama_dir, tmp_path, own_cache, tokenizer):
    long = {"instruction": "Repeat: " + "x " * 300, "output": "done"}
    huge_answer = {"instruction": "Say a lot.", "output": "y " * 300}
    short = {"instruction": "Hi", "output": "Hello"}
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [long] * 3 + [huge_answer] * 2 + [short] * 10))
    cfg = recipe(tiny_llama_dir, tmp_path / "run", path=str(path), eval_path=str(path), max_length=96)
    tokens = tokenize_train(cfg, tokenizer, load_data(cfg))
    assert {k: tokens.stats[k] for k in ("records", "kept", "truncated", "dropped")} == \
        {"records": 15, "kept": 13, "truncated": 3, "dropped": 2}
    assert all(len(item["input_ids"]) <= 96 for item in tokens.dataset)


def test_mixing_weights_give_the_proportions(tmp_path, own_cache, tokenizer, tiny_llama_dir):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.csv"
    a.write_text("".join(json.dumps({"instruction": f"Zeta {i}", "output": "z"}) + "\n" for i in range(50)))
    pa.csv.write_csv(qa_table(300), b)
    cfg = recipe(tiny_llama_dir, tmp_path / "run", train_size=400, eval_size=20, seed=3, datasets=[
        {"path": str(a), "weight": 3},
        {"path": str(b), "weight": 1, "columns": {"instruction": "question", "output": "answer"}}])
    tokens = tokenize_train(cfg, tokenizer, load_data(cfg))
    texts = [tokenizer.decode(item["input_ids"]) for item in tokens.dataset]
    from_a = sum("<|im_start|>user\nZeta" in t for t in texts)
    assert (from_a, len(texts) - from_a) == (300, 100)  # 400 x 3/4 (a repeats its 40 training records) and 400 x 1/4
    again = tokenize_train(cfg, tokenizer, load_data(cfg))
    assert [again.dataset[i] for i in range(20)] == [tokens.dataset[i] for i in range(20)]  # same seed, same mix
    # The held-out records: each source its weighted share of eval_size.
    held = load_data(cfg).eval
    assert sum(r["instruction"].startswith("Zeta") for r in held) == 10 and len(held) == 15  # a: min(15, 50 // 5)


def test_bad_column_mapping_is_a_clear_error(tmp_path, tiny_llama_dir):
    path = tmp_path / "qa.parquet"
    pa.parquet.write_table(qa_table(10), path)
    cfg = recipe(tiny_llama_dir, tmp_path / "run", path=str(path),
                 columns={"instruction": "prompt", "output": "answer"})
    with pytest.raises(ConfigError) as exc:
        check_data(cfg)
    message = str(exc.value)
    assert exc.value.errors[0].key == "data.columns" if hasattr(exc.value, "errors") else exc.value.key == "data.columns"
    assert "'prompt'" in message and str(path) in message and "['question', 'answer', 'source']" in message
    with pytest.raises(ConfigError, match=r"data\.columns\.question.*record fields"):
        recipe(tiny_llama_dir, tmp_path / "run", path=str(path), columns={"question": "instruction"})
    with pytest.raises(ConfigError, match=r"data\.eval_split.*only with a hub dataset id"):
        recipe(tiny_llama_dir, tmp_path / "run", path=str(path), eval_split="test")  # a file has no splits
    with pytest.raises(ConfigError, match=r"data\.path.*record 0.*cannot tell the format"):
        check_data(recipe(tiny_llama_dir, tmp_path / "run", path=str(path)))  # no mapping: not a known format


def test_hub_dataset_from_the_hf_cache_offline(tmp_path, own_cache, monkeypatch, tokenizer, tiny_llama_dir):
    """A hub id resolves to its snapshot in the HF cache without the hub (HF_HUB_OFFLINE), as models do."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--someorg--qa"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "data").mkdir(parents=True)
    pa.parquet.write_table(qa_table(30), repo / "snapshots" / commit / "data" / "train-00000-of-00001.parquet")
    pa.parquet.write_table(qa_table(6, offset=100), repo / "snapshots" / commit / "data" / "test-00000-of-00001.parquet")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = recipe(tiny_llama_dir, tmp_path / "run", path="someorg/qa", eval_split="test",
                 columns={"instruction": "question", "output": "answer"})
    run_data = load_data(cfg)
    assert len(run_data.train[0].records) == 30 and [r["output"] for r in run_data.eval] == \
        [str(2 * i + 1) for i in range(100, 106)]
    assert commit in run_data.train[0].key  # the cache entry names the snapshot's commit
    assert tokenize_train(cfg, tokenizer, run_data).stats["kept"] == 30
    with pytest.raises(ConfigError, match=r"data\.path.*HF cache.*HF_HUB_OFFLINE is set and it is not cached"):
        load_data(recipe(tiny_llama_dir, tmp_path / "run", path="someorg/missing"))


def test_ddp_main_process_tokenizes_the_other_loads(tmp_path, own_cache, tiny_llama_dir):
    """2 processes (DDP, gloo): one tokenization, by the main process; the other process waits, then loads it."""
    from dist_helpers import metrics, recipe, run, train_args

    path = recipe(tmp_path, tiny_llama_dir, "lora", max_steps=2)
    raw = yaml.safe_load(path.read_text())
    data = tmp_path / "qa.parquet"
    pa.parquet.write_table(qa_table(60), data)
    raw["data"] = {"path": str(data), "eval_size": 6, "columns": {"instruction": "question", "output": "answer"}}
    path.write_text(yaml.safe_dump(raw))
    proc = run(train_args(path, tmp_path / "ddp", "ddp"))
    log = proc.stdout + proc.stderr
    assert log.count("records tokenized in") == 2 and "(process 1)" not in log, log[-3000:]  # train + held-out
    assert len(cache.entries("tokenized")) == 2
    assert metrics(tmp_path / "ddp")["data"] == {"train": 54, "eval": 6}
