"""Equivalence across backends, on CPU with 2 processes (gloo): single process (gradient accumulation 2) vs
DDP vs DeepSpeed ZeRO-2 vs ZeRO-3 (parameters really partitioned) vs FSDP2 give the same per-step losses, the
same sampled subnets and the same exported adapter, for LoRA and for the elastic supernet."""

import json

import pytest
from dist_helpers import assert_same_adapter, metrics, recipe, run, train_args

BACKENDS = ["single", "ddp", "zero2", "zero3", "fsdp2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir):
    """Every backend's run of both recipes, made once for the module."""
    tmp = tmp_path_factory.mktemp("backends")
    done = {}
    for method in ("lora", "elastic"):
        path = recipe(tmp, tiny_llama_dir, method)
        for backend in BACKENDS:
            out = tmp / f"{method}-{backend}"
            run(train_args(path, out, backend))
            done[method, backend] = out
    return done


@pytest.mark.parametrize("method", ["lora", "elastic"])
@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_backend_matches_single_process(runs, method, backend):
    ref, out = runs[method, "single"], runs[method, backend]
    assert metrics(out)["train"]["backend"] == backend and metrics(out)["train"]["world_size"] == 2
    ref_losses, losses = metrics(ref)["train"]["losses"], metrics(out)["train"]["losses"]
    assert len(losses) == len(ref_losses) == 6
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    assert_same_adapter(ref, out)
    if method == "elastic":
        samples = (out / "elastic_samples.jsonl").read_text()
        assert samples == (ref / "elastic_samples.jsonl").read_text()
        assert len({json.dumps(json.loads(l)["subnet"]) for l in samples.splitlines()}) > 1
