"""flexrank as users install it: a wheel built from this checkout, installed in a fresh virtual environment,
run from a folder without the repository: `flexrank check` of a shipped recipe, and a 2-process DDP run of the
shipped Shears recipe (its NNCF JSON and the DDP accelerate config come from the installed package).

flexrank's own files come only from the wheel (the checkout is not on the path, and the test asserts where
`flexrank` is imported from). Its dependencies (torch, transformers, ...) are those of the environment running
the tests, made visible to the fresh one through a .pth line, instead of reinstalling gigabytes of wheels;
`pip check` then confirms that the wheel's declared requirements are met there.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from dist_helpers import ROOT, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, flexrank command, folder to run in) of a fresh venv holding only the wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    # From a clean copy: setuptools would also pack whatever an earlier build left in the checkout's build/.
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "runs", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp / "dist")], check=True, capture_output=True, cwd=tmp, env=_env())
    wheel = next((tmp / "dist").glob("flexrank-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True, env=_env()).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, env=_env())  # no PYTHONPATH: nothing hides the install
    # After installing: pip would otherwise take the test environment's (editable) flexrank as already there.
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "flexrank_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")  # appended after site itself
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return python, venv / "bin" / "flexrank", elsewhere, site


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _run(args, cwd, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=_env())
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def test_wheel_holds_flexrank_with_its_shipped_files_and_met_requirements(installed):
    python, _, cwd, site = installed
    where = _run([python, "-c", "import flexrank; print(flexrank.__file__)"], cwd).stdout.strip()
    assert Path(where) == site / "flexrank" / "__init__.py"
    for name in ("accelerate_configs/ddp.yaml", "ds_configs/zero3.json", "recipes/analogy_shears.yaml",
                 "recipes/nncf_shears_smollm2.json", "slurm/sweep.sbatch"):
        shipped = site / "flexrank" / name
        assert not shipped.is_symlink() and shipped.read_bytes() == (ROOT / name).read_bytes(), name
    check = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "check"], capture_output=True,
                           text=True, cwd=cwd, env=_env()).stdout  # other lines: the model wheels, installed --no-deps
    assert "flexrank" not in check, check


def test_installed_flexrank_checks_and_trains_a_shipped_recipe_on_two_processes(installed, tiny_llama_dir):
    python, flexrank, cwd, site = installed
    checked = _run([flexrank, "check", "analogy_elastic"], cwd).stdout
    assert "method: elastic" in checked
    out = cwd / "run"
    proc = _run([flexrank, "train", "analogy_shears", "--nproc", "2", "--backend", "ddp",
                 "--main-process-port", free_port(), *sum((["--set", s] for s in (
                     f"model.name_or_path={tiny_llama_dir}", "data.train_size=32", "data.eval_size=8",
                     "eval.before=false", "eval.after=false", "adapter.sparsity.calibration_samples=4",
                     "training.per_device_train_batch_size=2", "training.max_steps=2", "training.logging_steps=1",
                     "training.report_to=[]", f"training.output_dir={out}")), [])], cwd)
    launch = next(line for line in proc.stdout.splitlines() if line.startswith("[flexrank] launching:"))
    assert f"--config_file {site / 'flexrank' / 'accelerate_configs' / 'ddp.yaml'}" in launch
    m = json.loads((out / "metrics.json").read_text())
    assert m["train"]["world_size"] == 2 and m["train"]["backend"] == "ddp" and len(m["train"]["losses"]) == 2
    assert m["export"]["total_rank"] == 2 * 5 * 12  # the NNCF JSON's heuristic width 12 on 2 layers x 5 modules
