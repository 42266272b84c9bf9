"""Outputs appear whole or not at all; export never deletes a folder it did not write; the bundled model's
conversion runs once when several processes start on an empty cache; nothing flexrank reads is unpickled."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
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


# --- no pickle where a run or an export is read

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "flexrank"
UNPICKLING_CALLS = {f"{m}.{f}" for m in ("pickle", "_pickle", "cPickle") for f in ("load", "loads", "Unpickler")} | {
    "marshal.load", "marshal.loads", "shelve.open", "pandas.read_pickle"}
PICKLE_LIBRARIES = ("dill", "cloudpickle", "joblib")  # any use of these is refused, not only their loads
TORCH_LOADS = {"torch.load", "torch.serialization.load"}


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(root: Path) -> list[str]:
    """`path:line: what` for every way a .py file under `root` could unpickle: torch.load without a literal
    `weights_only=True`, any `weights_only` not literally True, a pickle/marshal/shelve load, numpy's
    `allow_pickle=True`, and any import of dill, cloudpickle or joblib (import aliases are followed)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        alias = {}  # local name -> dotted name it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    alias[(a.asname or a.name).split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    alias[a.asname or a.name] = f"{node.module}.{a.name}"

        def dotted(node):
            parts = []
            while isinstance(node, ast.Attribute):
                parts.append(node.attr)
                node = node.value
            if not isinstance(node, ast.Name):
                return None
            return ".".join([alias.get(node.id, node.id)] + parts[::-1])

        def report(node, what):
            found.append(f"{path.relative_to(root)}:{node.lineno}: {what}")

        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for name in names:
                    if name.split(".")[0] in PICKLE_LIBRARIES:
                        report(node, f"imports {name}")
                if isinstance(node, ast.ImportFrom) and node.module:
                    for a in node.names:
                        if f"{node.module}.{a.name}" in UNPICKLING_CALLS:
                            report(node, f"imports {node.module}.{a.name}")
            if not isinstance(node, ast.Call):
                continue
            name = dotted(node.func) or ""
            keywords = {k.arg: k.value for k in node.keywords}
            if name.split(".")[0] in PICKLE_LIBRARIES or name in UNPICKLING_CALLS:
                report(node, f"calls {name}")
            if name in TORCH_LOADS and not _is_true(keywords.get("weights_only")):
                report(node, f"{name} without weights_only=True")
            elif "weights_only" in keywords and not _is_true(keywords["weights_only"]):
                report(node, f"{name}(weights_only={ast.unparse(keywords['weights_only'])})")
            if "allow_pickle" in keywords and not (isinstance(keywords["allow_pickle"], ast.Constant)
                                                   and keywords["allow_pickle"].value is False):
                report(node, f"{name}(allow_pickle={ast.unparse(keywords['allow_pickle'])})")
            if "pickle_module" in keywords:
                report(node, f"{name}(pickle_module=...)")
    return found


def test_flexrank_never_unpickles():
    assert PACKAGE_DIR.is_dir()
    assert unsafe_loads(PACKAGE_DIR) == []


PLANTED = {
    "torch_load.py": "import torch\ntorch.load('x.pt')\n",
    "torch_load_false.py": "import torch\ntorch.load('x.pt', map_location='cpu', weights_only=False)\n",
    "torch_load_variable.py": "import torch\nsafe = True\ntorch.load('x.pt', weights_only=safe)\n",
    "torch_alias.py": "import torch as t\nt.serialization.load('x.pt')\n",
    "torch_from.py": "from torch import load\nload('x.pt')\n",
    "pickle_loads.py": "import pickle\npickle.loads(b'')\n",
    "pickle_alias.py": "import pickle as p\np.load(open('x', 'rb'))\n",
    "pickle_from.py": "from pickle import Unpickler\n",
    "dill.py": "import dill\n",
    "cloudpickle.py": "from cloudpickle import loads\n",
    "numpy.py": "import numpy as np\nnp.load('x.npy', allow_pickle=True)\n",
}
SAFE = "import torch\nimport json\ntorch.load('x.pt', weights_only=True)\njson.loads('{}')\n# pickle.load in a comment\n"


def test_the_pickle_scanner_finds_each_planted_load(tmp_path):
    for name, source in {**PLANTED, "safe.py": SAFE}.items():
        (tmp_path / name).write_text(source)
    found = unsafe_loads(tmp_path)
    assert sorted({line.split(":")[0] for line in found}) == sorted(PLANTED)  # each planted file, never safe.py
    assert len(found) == len(PLANTED)  # one finding each


class Payload:
    """What a hostile model.pt could hold: unpickling it runs code (here, it writes a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def plant_pickle_payload(folder: Path, marker: Path) -> Path:
    """An old-format INT4 folder whose model.pt runs code when unpickled (checked here, on a copy)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(Payload(marker), folder / "model.pt")
    probe = marker.with_name("probe.pt")
    torch.save(Payload(marker), probe)
    torch.load(probe, weights_only=False)  # the payload is live: unpickled, it writes the marker
    assert marker.read_text() == "ran"
    marker.unlink()
    probe.unlink()
    return folder / "model.pt"


def test_an_old_pickled_int4_model_is_refused_unread(tmp_path):
    from flexrank.adapters.nncf import load_int4

    marker = tmp_path / "pwned"
    plant_pickle_payload(tmp_path / "int4_model", marker)
    with pytest.raises(ConfigError, match="never loaded.*flexrank export RUN_DIR --out DIR.*flexrank train") as err:
        load_int4(tmp_path / "int4_model")
    assert "\n" not in str(err.value) and str(tmp_path / "int4_model" / "model.pt") in str(err.value)
    assert not marker.exists()
    with pytest.raises(ConfigError, match="no int4_config.json"):  # and a folder holding neither format
        load_int4(tmp_path)
