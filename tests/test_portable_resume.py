"""Resuming a sharded run on another world size or under another backend, through the checkpoint's portable
(world-size-independent) trainable state: the resumed run ends with the uninterrupted run's adapter and per-step
losses. The uninterrupted run writes checkpoint-3 of 6 steps; a copy of it alone is resumed elsewhere.

Tolerance: adapters within 1e-5, losses within 1e-5 for every pair. The resumed run sees the same samples per
step (same global batch); it differs from the uninterrupted run only in reduction order (2-process all-reduce vs
2 accumulated micro-batches, ZeRO's flat fp32 partitions), ~1e-7 relative in the gradients, which 3 Adam steps
at lr 1e-2 keep far below 1e-5 (seen: adapters <= 3e-8, losses <= 2e-6 for ZeRO-3 -> 1, FSDP2 -> 1, ZeRO-3 ->
FSDP2, ZeRO-2 -> FSDP2)."""

import json
import shutil

import pytest
from dist_helpers import assert_same_adapter, metrics, recipe, run, train_args

from flexrank.checkpoints import manifest as checkpoints, portable_state
from flexrank.errors import ConfigError

SAVE = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3}
LOADED = "loaded the trainable state from"


def resume_elsewhere(path, full, out, backend):
    """Resume from a copy of the uninterrupted run's checkpoint-3 under `backend`; returns the launch's stdout."""
    out.mkdir()
    shutil.copytree(full / "checkpoint-3", out / "checkpoint-3")
    proc = run(train_args(path, out, backend, "--resume", "auto", match_two_processes=False))
    assert LOADED in proc.stdout
    assert metrics(out)["train"]["resumed_from"].endswith("checkpoint-3")
    assert metrics(out)["train"]["losses"] == pytest.approx(metrics(full)["train"]["losses"], abs=1e-5)
    assert_same_adapter(full, out, atol=1e-5)
    assert metrics(out)["export"]["rank_pattern"] == metrics(full)["export"]["rank_pattern"]
    return proc.stdout


@pytest.mark.parametrize("method", ["lora", "elastic", "adalora"])
def test_zero3_checkpoint_resumes_on_one_process(tmp_path, tiny_llama_dir, method):
    """AdaLoRA budgets at steps 2..4 of 6: checkpoint-3 is mid-budgeting, its importance EMAs must cross. The
    AdaLoRA checkpoint is also resumed on 2 FSDP2 processes (another backend, same world size)."""
    path = recipe(tmp_path, tiny_llama_dir, method, **SAVE)
    full = tmp_path / "full"
    run(train_args(path, full, "zero3"))
    assert "flexrank_portable.pt" in json.loads((full / "checkpoint-3" / checkpoints.MANIFEST).read_text())["files"]
    stdout = resume_elsewhere(path, full, tmp_path / "single", "single")
    assert "world size 2 -> 1; gradient_accumulation_steps 1 -> 2" in stdout
    if method == "adalora":
        resume_elsewhere(path, full, tmp_path / "fsdp2", "fsdp2")


def test_fsdp2_checkpoint_resumes_on_one_process(tmp_path, tiny_llama_dir):
    path = recipe(tmp_path, tiny_llama_dir, "elastic", **SAVE)
    full = tmp_path / "full"
    run(train_args(path, full, "fsdp2"))
    resume_elsewhere(path, full, tmp_path / "single", "single")


def test_zero2_checkpoint_resumes_under_fsdp2(tmp_path, tiny_llama_dir):
    """SoRA's gates have a parameter group of their own: ZeRO-2 links the Adam state of later groups only when
    asked again (see portable_state._link_zero12_state)."""
    path = recipe(tmp_path, tiny_llama_dir, "sora", **SAVE)
    full = tmp_path / "full"
    run(train_args(path, full, "zero2"))
    resume_elsewhere(path, full, tmp_path / "fsdp2", "fsdp2")


def _checkpoint(folder, backend, world_size, portable: bool):
    folder.mkdir()
    if portable:
        (folder / portable_state.PORTABLE_FILE).write_bytes(b"x")
    checkpoints.mark_complete(folder, {"global_step": 3, "backend": backend, "world_size": world_size,
                                       "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1})
    return folder


def test_which_checkpoints_resume_through_the_portable_state(tmp_path):
    zero3 = _checkpoint(tmp_path / "a", "zero3", 2, portable=True)
    assert portable_state.layout_changed(zero3, "zero3", 2) is False  # same layout: the Trainer's own files
    assert portable_state.layout_changed(zero3, "zero3", 4) is True
    assert portable_state.layout_changed(zero3, "fsdp2", 2) is True
    old_ddp = _checkpoint(tmp_path / "b", "ddp", 2, portable=False)
    assert portable_state.layout_changed(old_ddp, "single", 1) is False  # full tensors: the Trainer loads them
    old_zero3 = _checkpoint(tmp_path / "c", "zero3", 2, portable=False)
    with pytest.raises(ConfigError, match="written by 2 zero3 processes; this run is 1 single"):
        portable_state.layout_changed(old_zero3, "single", 1)
