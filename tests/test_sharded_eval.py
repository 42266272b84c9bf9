"""Sharded evaluation: `choice`, `exact_match` and `loss` on 2 processes equal one process's numbers: DDP, and
ZeRO-3 / FSDP2 both with the full parameters gathered once for the phase (eval.gather_parameters auto: the tiny
model fits) and left sharded (false: every forward a collective, generation under synced_gpus). Every prompt is
cut to data.max_length, as in training, and the summary says so. learning_rate 0 so that the trained adapter is the
initial one."""

import json

import pytest
import yaml

from dist_helpers import metrics, run, train_args

LABELS = ["sports", "business", "tech", "politics"]


@pytest.fixture(scope="module")
def topic_recipe(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("sharded_eval")
    records = [{"instruction": "Topic of this headline?", "input": f"headline {i} on {LABELS[i % 4]}",
                "output": LABELS[i % 4]} for i in range(50)]
    (tmp / "topics.json").write_text(json.dumps(records))
    raw = {"model": {"name_or_path": str(tiny_llama_dir)},
           # 9 held-out records in batches of 4: 3 batches (choice: 9 of 1 record x 4 labels), so with sharded
           # weights one process runs a padding forward in each part; max_length 40: every prompt (SmolLM2's
           # template adds a ~30-token system turn) is cut
           "data": {"path": str(tmp / "topics.json"), "eval_size": 9, "max_length": 40},
           "adapter": {"method": "lora", "r": 4},
           "eval": {"before": False, "after": True, "batch_size": 4, "max_new_tokens": 4,
                    "metrics": ["loss", "exact_match", "choice"]},
           "training": {"learning_rate": 0.0, "per_device_train_batch_size": 2, "max_steps": 1, "report_to": [],
                        "seed": 0}}
    path = tmp / "topics.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def single(topic_recipe):
    out = topic_recipe.parent / "single"
    run(train_args(topic_recipe, out, "single"))
    return metrics(out)["after"]


@pytest.mark.parametrize("backend, gather", [("ddp", "auto"), ("zero3", "auto"), ("zero3", "false"),
                                             ("fsdp2", "auto"), ("fsdp2", "false")])
def test_two_processes_match_one(topic_recipe, single, backend, gather):
    out = topic_recipe.parent / f"{backend}-{gather}"
    proc = run(train_args(topic_recipe, out, backend, "--set", f"eval.gather_parameters={gather}"))
    after = metrics(out)["after"]
    assert after["n"] == single["n"] == 9 and after["choice_labels"] == 4
    for key in ("choice", "exact_match", "loss", "tokens"):
        assert after[key] == single[key], key  # same batches, gathered in order: bit-identical
    assert [e["pred"] for e in after["examples"]] == [e["pred"] for e in single["examples"]]
    assert proc.stdout.count("[flexrank] after training: exact_match=") == 1  # one summary line, main process
    assert after["truncated"] == single["truncated"] == 9 and "9 prompts truncated to 40 tokens" in proc.stdout
    if backend != "ddp":
        mode = "full parameters gathered once" if gather == "auto" else "parameters stay sharded"
        assert f"[flexrank] evaluation under {backend}: {mode}" in proc.stdout


def test_gather_estimate_counts_the_missing_shards_in_their_dtype():
    """What `eval.gather_parameters: auto` weighs against free memory: full size less the local shard, per dtype."""
    from types import SimpleNamespace

    import torch

    from flexrank.distributed.backends import missing_bytes

    bf16 = torch.empty(0, dtype=torch.bfloat16).element_size
    zero3 = [SimpleNamespace(ds_numel=1000, ds_tensor=torch.empty(500), element_size=bf16),
             SimpleNamespace(ds_numel=10, ds_tensor=torch.empty(5), element_size=lambda: 4)]
    assert missing_bytes(zero3, "zero3") == 500 * 2 + 5 * 4
    local = torch.empty(300)
    fsdp2 = [SimpleNamespace(numel=lambda: 1200, to_local=lambda: local, element_size=lambda: 4),
             torch.empty(7)]  # a replicated (plain) tensor: nothing missing
    assert missing_bytes(fsdp2, "fsdp2") == 900 * 4
