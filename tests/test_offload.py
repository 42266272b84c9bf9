"""ZeRO with optimizer offload, on CPU with 2 processes (gloo): SoRA's L1 + proximal step and AdaLoRA's importance
act on the optimizer that really steps, so the runs match one process (gradient accumulation 2): same per-step
losses, same zeroed gates / final rank pattern, same exported adapter.

- `zero3_offload` as shipped (ds_configs/zero3_offload.json: the Trainer's torch optimizer steps on the offloaded
  fp32 partitions, `zero_force_ds_cpu_optimizer: false`);
- ZeRO-2 with offload_optimizer and DeepSpeed's default `zero_force_ds_cpu_optimizer: true`: accelerate then
  replaces the Trainer's optimizer by a DeepSpeedCPUAdam (a C++ op built once per machine, cached under
  TORCH_EXTENSIONS_DIR), the case where hooks on the Trainer's optimizer never ran.
"""

import json

import pytest
from dist_helpers import ROOT, assert_same_adapter, metrics, recipe, run, train_args


def offload_config(tmp, base: str, **extra) -> str:
    """A test variant of a shipped DeepSpeed config: tiny LoRA tensors partitioned too (ZeRO-3 threshold 0),
    optimizer offloaded to the CPU."""
    cfg = json.loads((ROOT / "ds_configs" / base).read_text())
    zero = cfg["zero_optimization"]
    zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": False})
    if zero["stage"] == 3:
        zero["stage3_param_persistence_threshold"] = 0
    cfg.update(extra)
    path = tmp / f"test_{base}"
    path.write_text(json.dumps(cfg))
    return f"distributed.deepspeed_config={path}"


def check_matches_single_process(ref, out, backend):
    assert metrics(out)["train"]["backend"] == backend and metrics(out)["train"]["world_size"] == 2
    losses, ref_losses = metrics(out)["train"]["losses"], metrics(ref)["train"]["losses"]
    assert len(losses) == len(ref_losses) == 6
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    assert_same_adapter(ref, out)
    pattern = metrics(out)["export"]["rank_pattern"]
    assert pattern == metrics(ref)["export"]["rank_pattern"]
    assert sum(pattern.values()) < 4 * 14  # ranks were really pruned (14 modules of rank 4)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, tiny_llama_dir):
    """(recipe, run folder) of each method's one-process reference run, made once for the module."""
    tmp, done = tmp_path_factory.mktemp("offload"), {}

    def get(method):
        if method not in done:
            path, out = recipe(tmp, tiny_llama_dir, method), tmp / f"{method}-single"
            run(train_args(path, out, "single"))
            done[method] = path, out
        return done[method]

    return get


@pytest.mark.parametrize("method", ["sora", "adalora"])
def test_zero3_offload_matches_single_process(tmp_path, single_process, method):
    path, ref = single_process(method)
    out = tmp_path / "zero3_offload"
    run(train_args(path, out, "zero3_offload", "--set", offload_config(tmp_path, "zero3_offload.json")))
    check_matches_single_process(ref, out, "zero3")
    if method == "adalora":  # the budget reached its target exactly: target_r x modules
        assert metrics(out)["export"]["total_rank"] == 2 * 14


def test_sora_on_deepspeed_cpu_adam_matches_single_process(tmp_path, single_process):
    """ZeRO-2 + offload with DeepSpeed's default optimizer swap: the gates' L1 and prox run in DeepSpeedCPUAdam."""
    path, ref = single_process("sora")
    out = tmp_path / "zero2_offload"
    proc = run(train_args(path, out, "zero2", "--set", offload_config(tmp_path, "zero2.json")))
    assert "SoRAController hooks on the optimizer that steps: DeepSpeedCPUAdam" in proc.stdout
    check_matches_single_process(ref, out, "zero2")
