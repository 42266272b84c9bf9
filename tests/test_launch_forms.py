"""The two ways to start several processes: `flexrank train --nproc 2 --backend ddp` (flexrank builds the
`accelerate launch` command) and `accelerate launch --config_file accelerate_configs/ddp.yaml -m flexrank train`
(what accelerate users type) run the same training."""

import sys

import pytest
from dist_helpers import ROOT, assert_same_adapter, free_port, metrics, recipe, run


def test_accelerate_launch_form_matches_flexrank_nproc(tiny_llama_dir, tmp_path):
    path = recipe(tmp_path, tiny_llama_dir, "lora", max_steps=3)
    ours, theirs = tmp_path / "flexrank-nproc", tmp_path / "accelerate-launch"
    run([sys.executable, "-m", "flexrank", "train", str(path), "--nproc", "2", "--backend", "ddp",
         "--main-process-port", str(free_port()), "--set", f"training.output_dir={ours}"])
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "accelerate_configs" / "ddp.yaml"), "--num_processes", "2",
                "--main_process_port", str(free_port()),
                "-m", "flexrank", "train", str(path), "--set", f"training.output_dir={theirs}",
                # a recipe written for `flexrank train` (2 processes): inside accelerate, flexrank must not launch again
                "--set", "distributed.nproc=2", "--set", "distributed.backend=ddp"])
    assert "[flexrank] launching" not in proc.stdout
    for out in (ours, theirs):
        assert metrics(out)["train"]["world_size"] == 2 and metrics(out)["train"]["backend"] == "ddp"
    assert len(metrics(theirs)["train"]["losses"]) == 3
    assert metrics(theirs)["train"]["losses"] == pytest.approx(metrics(ours)["train"]["losses"], abs=1e-6)
    assert_same_adapter(ours, theirs, atol=1e-6)
