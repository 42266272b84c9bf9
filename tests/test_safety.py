"""Outputs appear whole or not at all; export never deletes a folder it did not write; the bundled model's
conversion runs once when several processes start on an empty cache."""

import os
import subprocess
import sys
import textwrap

import pytest
from peft import LoraConfig, get_peft_model

from flexrank.io import atomic_path, write_atomic
from flexrank.errors import ConfigError
from flexrank.adapters.export import EXPORT_MARKER, export_plain_adapter


def test_a_failed_write_leaves_the_previous_version(tmp_path):
    dest = tmp_path / "supernet"
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed while writing")
    assert (dest / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["supernet"]  # no temporary left behind
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "other").write_text("v2")
    assert sorted(p.name for p in dest.iterdir()) == ["other"]  # replaced whole, not merged
    write_atomic(tmp_path / "config.yaml", "a: 1\n")
    write_atomic(tmp_path / "config.yaml", "a: 2\n")
    assert (tmp_path / "config.yaml").read_text() == "a: 2\n"


def test_export_refuses_a_folder_it_did_not_write(tiny_llama, tmp_path):
    peft_model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]))
    foreign = tmp_path / "my_project"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="--out.*a new or empty folder, or a previous flexrank export"):
        export_plain_adapter(peft_model, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()
    export_plain_adapter(peft_model, empty)
    assert (empty / EXPORT_MARKER).is_file() and (empty / "adapter_model.safetensors").is_file()
    (empty / "stale.bin").write_text("from the previous export")
    export_plain_adapter(peft_model, empty)  # a previous export is replaced whole
    assert not (empty / "stale.bin").exists()


BUILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from flexrank.models.assets import build_once

    out, log = Path(sys.argv[1]), Path(sys.argv[2])
    def build(folder):
        with open(log, "a") as f:
            f.write("built\\n")
        time.sleep(3)  # long enough for the other process to arrive while this one builds
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    print(build_once(out, build))
""")


def test_processes_starting_on_an_empty_cache_build_once(tmp_path):
    out, log = tmp_path / "cache" / "model", tmp_path / "builds.log"
    out.parent.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(out), str(log)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert log.read_text() == "built\n"  # one conversion; the others waited and found it done
    assert all(r[0].strip() == str(out) for r in results)
    assert (out / "config.json").read_text() == "{}"
