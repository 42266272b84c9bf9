"""ZeRO with optimizer offload, on CPU with 2 processes (gloo): SoRA's L1 + proximal step and AdaLoRA's importance
act on the optimizer that really steps, so the runs match one process (gradient accumulation 2): same per-step
losses, same zeroed gates / final rank pattern, same exported adapter.

- `zero3_offload` as shipped (ds_configs/zero3_offload.json: the Trainer's torch optimizer steps on the offloaded
  fp32 partitions, `zero_force_ds_cpu_optimizer: false`);
- ZeRO-2 with offload_optimizer and DeepSpeed's default `zero_force_ds_cpu_optimizer: true`: accelerate then
  replaces the Trainer's optimizer by a DeepSpeedCPUAdam (a C++ op built once per machine, cached under
  TORCH_EXTENSIONS_DIR), the case where hooks on the Trainer's optimizer never ran.

Hooks that cannot act stop the run loudly (in process, one process).
"""

import json

import pytest
import torch
from conftest import tiny_llama_config
from dist_helpers import ROOT, assert_same_adapter, metrics, recipe, run, train_args
from elastic_helpers import ProgressionData
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM, TrainingArguments

from flexrank.controllers import SoRAController
from flexrank.training.trainer import FlexTrainer
from flexrank.adapters.rank_layer import rank_layers, register_rank_layer


def offload_config(tmp, base: str) -> str:
    """A test variant of a shipped DeepSpeed config: tiny LoRA tensors partitioned too (ZeRO-3 threshold 0),
    optimizer offloaded to the CPU."""
    cfg = json.loads((ROOT / "ds_configs" / base).read_text())
    zero = cfg["zero_optimization"]
    zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": False})
    if zero["stage"] == 3:
        zero["stage3_param_persistence_threshold"] = 0
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


class _HooksLost(SoRAController):
    """Records the optimizer but registers nothing: as if the optimizer had been replaced after `attach`."""

    def attach(self, optimizer):
        self._hooked[optimizer] = ()


def _sora_trainer(tmp_path, controller_class, create_optimizer=None):
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(tiny_llama_config()),
                           register_rank_layer(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")))
    controller = controller_class(rank_layers(model), sparse_lambda=0.1, threshold=0.01)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[],
                             use_cpu=True, save_strategy="no")
    trainer = FlexTrainer(model=model, args=args, train_dataset=ProgressionData(n=8), controller=controller)
    if create_optimizer:  # an optimizer built without the controller's param group
        trainer.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return trainer


def test_hooks_that_do_not_run_stop_training_after_the_first_step(tmp_path):
    with pytest.raises(RuntimeError, match="_HooksLost's optimizer hooks did not run in the first optimizer step"):
        _sora_trainer(tmp_path, _HooksLost).train()


def test_an_optimizer_without_the_gate_group_is_refused_when_training_begins(tmp_path):
    with pytest.raises(RuntimeError, match="SoRA's gate param group is not in the optimizer that steps"):
        _sora_trainer(tmp_path, SoRAController, create_optimizer=True).train()
