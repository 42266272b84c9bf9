"""Controllers that do not stall the GPU: no tensor-to-host read in flexrank's per-step path (controllers, their
optimizer hooks, the rank layer, FlexTrainer and flexrank's callbacks) outside logging and save steps, and mask
writes only when a mask changes; nothing else in a whole non-logging step reads either (the Trainer's loop included)
but the model's mask builder, and the FLOP count does not walk the model every step. Runs on the CPU: host reads
are found by what they are (tests/host_reads.py)."""

import os

import pytest
import torch
from elastic_helpers import ProgressionData, elastic_supernet
from host_reads import HostRead, HostReadTrap
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback, TrainingArguments

from flexrank.adapters.rank_layer import rank_layers, register_rank_layer
from flexrank.checkpoints.preemption import PreemptionCallback
from flexrank.controllers import AdaLoRAController, ElasticController, SoRAController
from flexrank.elastic.distillation import Distillation
from flexrank.elastic.search_space import space_from_spec
from flexrank.training.trainer import FlexTrainer

STEPS, ACCUMULATION = 6, 2


class _ArmedSteps(TrainerCallback):
    """Arms the trap from the start of each optimizer step (its first micro-batch) to the end of its on_step_end
    callbacks (added last, so after flexrank's own); counts the steps checked."""

    def __init__(self, trap: HostReadTrap):
        self.trap, self.steps = trap, 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.trap.armed = True

    def on_step_end(self, args, state, control, **kwargs):
        self.trap.armed = False
        self.steps += 1


def _train(model, controller, out, steps=STEPS, **extra) -> tuple[HostReadTrap, FlexTrainer]:
    """FlexTrainer with flexrank's preemption callback, no logging or save step, every step checked."""
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2,
                             gradient_accumulation_steps=ACCUMULATION, max_steps=steps, learning_rate=1e-2, logging_steps=10 * steps, save_strategy="no",
                             report_to=[], use_cpu=True, seed=0, **extra)
    trainer = FlexTrainer(model=model, args=args, train_dataset=ProgressionData(), controller=controller)
    preemption = PreemptionCallback()
    trap = HostReadTrap()
    armed = _ArmedSteps(trap)
    trainer.add_callback(preemption)
    trainer.add_callback(armed)
    try:
        with trap:
            trainer.train()
    finally:
        preemption.restore_handlers()
    assert armed.steps == steps and trap.operators > 0 and trap.violations == []
    return trap, trainer


def _adalora(model, **schedule):
    peft_model = get_peft_model(model, register_rank_layer(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")))
    with torch.no_grad():  # AdaLoRA's init, as adapters.peft_methods.apply_adapter does it
        for name, p in peft_model.named_parameters():
            if ".lora_gate." in name:
                p.zero_()
            elif ".lora_A." in name or ".lora_B." in name:
                p.normal_(std=0.02)
    schedule = {"target_r": 2, "total_step": STEPS, "tinit": 1, "tfinal": 2, "delta_t": 1, **schedule}
    return peft_model, AdaLoRAController(rank_layers(peft_model), gradient_accumulation_steps=ACCUMULATION,
                                         **schedule)


def _sora(model, prox="sora"):
    peft_model = get_peft_model(model, register_rank_layer(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")))
    return peft_model, SoRAController(rank_layers(peft_model), sparse_lambda=0.1, threshold=0.01, prox=prox,
                                      dense_steps=1, max_threshold=0.05, stages=2, stage_steps=2)


BASE_WIDTHS = {"mlp": [1.0, 0.75, 0.5], "attention": [1.0, 0.5]}


@pytest.mark.parametrize("sandwich, distill", [(False, False), (False, True), (True, True)],
                         ids=["sampled", "sampled_distilled", "sandwich_checkpointed_distilled"])
def test_elastic_steps_read_nothing(tiny_llama, tmp_path, sandwich, distill):
    """Sampled subnets with base widths (rank masks and activation masks), gradient accumulation, the step losses
    kept on the device; in-place distillation (the teacher's forward with the maximal subnet's masks, or the
    sandwich's maximal pass as the teacher); the sandwich rule under gradient checkpointing (the mask-unchanged
    check runs)."""
    model, ctrl = elastic_supernet(tiny_llama, sandwich=sandwich, base_widths=BASE_WIDTHS,
                                   distill=Distillation(weight=0.5, temperature=2.0) if distill else None)
    checkpointing = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    extra = checkpointing if sandwich else {}
    _train(model, ctrl, tmp_path, **extra)
    assert sorted(ctrl.step_losses()) == list(range(STEPS))  # recorded as tensors, read here
    assert bool(ctrl._distill_unlogged) == distill  # the distillation terms, kept for the next logging step


def test_adalora_budget_phase_reads_nothing(tiny_llama, tmp_path):
    """Importance at every step, re-masking at steps 1-4 (cubic budget, then the target), the final mask at step 5,
    and the orthogonal regulariser: in every adapted layer's backward in the first pass, then batched in the
    trainer's extra loss."""
    model, ctrl = _adalora(tiny_llama)
    _train(model, ctrl, tmp_path)
    assert ctrl._batched_orthogonality and ctrl.orthogonality_values.numel() == len(ctrl.layers)
    assert ctrl.final and ctrl.budget == 2 * len(ctrl.layers) and ctrl.active_rank() == ctrl.budget


@pytest.mark.parametrize("prox", ["sora", "textbook"])
def test_sora_steps_read_nothing(tiny_llama, tmp_path, prox):
    """The L1 pre-hook every step and the proximal step once the dense phase is over (two threshold stages)."""
    model, ctrl = _sora(tiny_llama, prox)
    before = torch.cat([l.lora_gate["default"].detach().clone() for l in ctrl.layers.values()])
    _train(model, ctrl, tmp_path)
    after = torch.cat([l.lora_gate["default"].detach() for l in ctrl.layers.values()])
    assert ctrl.hook_calls == STEPS and not torch.equal(before, after)


def _read_in(controller, kind: str):
    """Make a per-step hook of the controller call one of its logging-only reads (flexrank code that reads)."""
    if kind == "elastic":  # after the optimizer step: the active rank (int(count_nonzero) of the masks)
        hook = controller.after_optimizer_step
        controller.after_optimizer_step = lambda step: (hook(step), controller.active_rank())
    elif kind == "adalora":  # with the final gradients: the logged metrics
        hook = controller.on_final_gradients
        controller.on_final_gradients = lambda: (hook(), controller.log_metrics())
    else:  # SoRA's proximal step, inside the optimizer step: the logged metrics (zero-gate count)
        hook = controller._prox
        controller._prox = lambda optimizer: (hook(optimizer), controller.log_metrics())


@pytest.mark.parametrize("kind", ["elastic", "adalora", "sora"])
def test_the_trap_catches_a_read_in_a_per_step_hook(tiny_llama, tmp_path, kind):
    """The trap has teeth: a logging-only read called from each controller's per-step hook fails the run at its
    first checked step, naming the flexrank line that read."""
    model, ctrl = {"elastic": elastic_supernet, "adalora": _adalora, "sora": _sora}[kind](tiny_llama)
    _read_in(ctrl, kind)
    with pytest.raises(HostRead, match=r"host read in flexrank's per-step path: .* at flexrank/controllers/"):
        _train(model, ctrl, tmp_path, steps=2)


# -- mask writes ------------------------------------------------------------------------------------------------

def _generations(ctrl) -> dict[str, int]:
    return {name: layer.mask_generation for name, layer in ctrl.layers.items()}


def test_elastic_writes_a_mask_only_when_its_width_changes(tiny_llama):
    """The sampled subnet is a function of (seed, step): masks are rewritten only for the modules whose width
    changed, not on the second micro-batch of a step, not within a sample_rate window; a mask written by someone
    else since is rewritten."""
    spec = {"groups": [["q_proj", "k_proj", "v_proj"], ["up_proj"], ["down_proj"]], "widths": [8, 6, 4],
            "stages": [{"sample_rate": 3}]}
    model, _ = elastic_supernet(tiny_llama)
    layers = rank_layers(model)
    ctrl = ElasticController(layers, space_from_spec(spec, list(layers), max_rank=8), seed=7, steps_per_epoch=100)
    widths = lambda: ctrl.space.module_widths(ctrl.config)  # noqa: E731
    before, seen_writes = _generations(ctrl), 0
    for step in range(9):
        previous = widths()
        for micro_batch in range(ACCUMULATION):
            ctrl.before_pass(step, 0)
            now = _generations(ctrl)
            changed = {n for n, w in widths().items() if w != previous.get(n)} if micro_batch == 0 else set()
            assert {n for n in now if now[n] != before[n]} == changed, (step, micro_batch)
            assert all(now[n] == before[n] + 1 for n in changed)
            if step % 3:  # inside a sample_rate window: the same subnet, nothing written
                assert not changed
            seen_writes += len(changed)
            before = now
        for name, layer in ctrl.layers.items():
            mask, width = layer.lora_rank_mask["default"], widths().get(name, 8)  # o_proj, gate_proj: no group
            assert mask[:width].eq(1).all() and mask[width:].eq(0).all(), name
    assert seen_writes  # the subnet did change at the window starts
    name = next(n for n, w in widths().items() if w > 1)  # a write from elsewhere is noticed and undone
    ctrl.layers[name].set_width(1)
    ctrl.before_pass(8, 0)
    assert int(ctrl.layers[name].lora_rank_mask["default"].sum()) == widths()[name]


def test_adalora_writes_masks_only_at_scheduled_steps(tiny_llama, batch):
    """The budget schedule is a function of the step: masks are written at the re-masking steps (every deltaT in
    the cubic phase, then once at the target), once per module, and at no other step."""
    model, ctrl = _adalora(tiny_llama, total_step=10, tinit=1, tfinal=3, delta_t=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    writes = []
    for step in range(10):
        before = _generations(ctrl)
        ctrl.before_pass(step, 0)
        model(**batch).loss.backward()
        ctrl.on_final_gradients()
        opt.step()
        opt.zero_grad()
        bumps = {after - before[n] for n, after in _generations(ctrl).items()}
        assert bumps in ({0}, {1}), step
        writes += [step] if bumps == {1} else []
    assert writes == [2, 4, 6, 8] and ctrl.final  # 7 = total - tfinal is no deltaT step; 8 is the final mask


def test_sora_never_writes_a_mask(tiny_llama, tmp_path):
    model, ctrl = _sora(tiny_llama)
    before = _generations(ctrl)
    _train(model, ctrl, tmp_path, steps=3)
    assert _generations(ctrl) == before


@pytest.mark.parametrize("kind", ["lora", "elastic"])
def test_a_whole_step_reads_nothing(tiny_llama, tmp_path, kind):
    """Nothing in a non-logging step of a FlexTrainer run reads a tensor on the host outside the model's forward,
    flexrank's code or not (the Trainer's loop, accelerate's gradient clipping, peft, the optimizer): the Trainer's
    own NaN/inf filter of the logged loss would, once per micro-batch; FlexTrainer applies it on the device. The
    model's forward reads once, in transformers' attention-mask builder (masking_utils: whether the row is packed,
    whether the padding mask can be skipped), as in a stock run."""
    if kind == "lora":
        model, ctrl = get_peft_model(tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")), None
    else:
        model, ctrl = elastic_supernet(tiny_llama)
    trap, _ = _train(model, ctrl, tmp_path, max_grad_norm=1.0)
    # (the elastic helper's recording controller reads its masks: test code)
    libraries = [read for read in trap.others if f"{os.sep}tests{os.sep}" not in read]
    outside_the_mask_builder = [read for read in libraries if "transformers/masking_utils.py" not in read]
    assert outside_the_mask_builder == [] and libraries  # the mask builder's reads show that others are seen


def test_the_flop_count_counts_the_parameters_once(tiny_llama, tmp_path):
    """The run's total FLOPs are the Trainer's (6 x tokens x non-embedding parameters), but the parameters are
    counted once: the Trainer counts them at every micro-batch, a walk over every module of the model (~8 ms per
    step for SmolLM2's 30 layers with LoRA on every linear layer)."""
    model = get_peft_model(tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    parameters = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    count, calls = tiny_llama.num_parameters, []
    tiny_llama.num_parameters = lambda **kwargs: (calls.append(kwargs), count(**kwargs))[1]
    _, trainer = _train(model, None, tmp_path)
    tokens = STEPS * ACCUMULATION * 2 * 16  # steps x micro-batches x 2 records of 16 tokens (ProgressionData)
    assert trainer.state.total_flos == 6 * tokens * parameters
    assert calls == [{"exclude_embeddings": True}]
