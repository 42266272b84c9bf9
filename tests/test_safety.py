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
    with pytest.raises(ConfigError, match="--out.*a new or empty folder, or one flexrank wrote"):
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


def _foreign(folder):
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    return folder


@pytest.mark.parametrize("recipe, folder", [("analogy_lora.yaml", "adapter"), ("analogy_elastic.yaml", "supernet"),
                                            ("analogy_shears.yaml", "sparse_base")])
def test_a_run_refuses_a_foreign_output_folder_before_any_work(tmp_path, recipe, folder):
    from flexrank.config import load_config
    from flexrank.run import train
    from flexrank.shipped import find_recipe

    out = tmp_path / "run"
    _foreign(out / folder)
    cfg = load_config(find_recipe(recipe), [f"training.output_dir={out}"])
    with pytest.raises(ConfigError, match=f"training.output_dir: got '{out / folder}'.*which flexrank will not"):
        train(cfg)
    assert (out / folder / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == [folder]  # nothing else written: no data, logs or config


def test_search_refuses_a_foreign_search_folder_before_the_model_loads(tmp_path):
    from flexrank.config import dump_config, load_config
    from flexrank.elastic.search import load_search_config
    from flexrank.shipped import find_recipe

    run_dir = tmp_path / "run"
    (run_dir / "supernet").mkdir(parents=True)  # no weights: the refusal must come first
    (run_dir / "config.yaml").write_text(dump_config(load_config(find_recipe("analogy_elastic.yaml"))))
    _foreign(run_dir / "search")
    with pytest.raises(ConfigError, match=r"search output \(RUN_DIR/search\): got .*which flexrank will not"):
        load_search_config(run_dir, [])
    assert (run_dir / "search" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("flag", ["--out", "--compact", "--merge-sparse"])
def test_export_refuses_a_foreign_folder_before_reading_the_run(tmp_path, capsys, flag):
    from flexrank.launcher.cli import main

    foreign = _foreign(tmp_path / "mine")
    # The run folder does not even exist: the refusal comes before anything is read or loaded.
    extra = ["--compact", str(tmp_path / "c")] if flag == "--merge-sparse" else []
    assert main(["export", str(tmp_path / "no_run"), flag, str(foreign), *extra]) == 2
    assert f"{flag}: got '{foreign}'" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me" and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_the_checkpoint_bench_refuses_a_foreign_out_folder(tmp_path):
    from pathlib import Path

    foreign = _foreign(tmp_path / "mine")
    bench = Path(__file__).resolve().parents[1] / "bench" / "checkpoint_cost.py"
    done = subprocess.run([sys.executable, str(bench), "--out", str(foreign)], capture_output=True, text=True)
    assert done.returncode != 0 and f"--out: got '{foreign}'" in done.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_a_marked_or_empty_folder_is_replaced_and_a_symlink_is_not(tmp_path):
    from flexrank.io import output_folder, refuse_foreign

    with output_folder(tmp_path / "adapter", "k") as tmp:
        (tmp / "v1").write_text("1")
    with output_folder(tmp_path / "adapter", "k") as tmp:  # flexrank's own folder: replaced whole
        (tmp / "v2").write_text("2")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [".flexrank", "v2"]
    (tmp_path / "empty").mkdir()
    refuse_foreign(tmp_path / "empty", "k")
    (tmp_path / "link").symlink_to(tmp_path / "adapter")  # a link to a flexrank folder is still not flexrank's
    with pytest.raises(ConfigError):
        refuse_foreign(tmp_path / "link", "k")
