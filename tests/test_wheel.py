"""flexrank as users install it: a wheel built from this checkout, installed in a fresh virtual environment,
run from a folder without the repository: `flexrank check` of a shipped recipe, and a 2-process DDP run of the
shipped Shears recipe (its NNCF JSON and the DDP accelerate config come from the installed package).

flexrank's own files come only from the wheel (the checkout is not on the path, and the test asserts where
`flexrank` is imported from). Its dependencies (torch, transformers, ...) are those of the environment running
the tests, made visible to the fresh one through a .pth line, instead of reinstalling gigabytes of wheels;
`pip check` then confirms that the wheel's declared requirements are met there.
"""

import configparser
import csv
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from dist_helpers import ROOT, free_port

SHIPPED_FOLDERS = ("recipes", "accelerate_configs", "ds_configs", "slurm")  # symlinks to the top level in a checkout

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
    check = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "check"], capture_output=True,
                           text=True, cwd=cwd, env=_env()).stdout  # other lines: the model wheels, installed --no-deps
    assert "flexrank" not in check, check


def package_data_files(root: Path, setup_cfg: Path) -> set[str]:
    """The files under flexrank/ that setup.cfg's [options.package_data] (less [options.exclude_package_data])
    says ship, as 'folder/name', globbed in the top-level originals (flexrank/<folder> links to <folder>)."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)

    def matches(section: str) -> set[str]:
        lines = cfg.get(section, "flexrank", fallback="").split()
        return {p.relative_to(root).as_posix() for glob in lines for p in root.glob(glob) if p.is_file()}

    return matches("options.package_data") - matches("options.exclude_package_data")


def shipped_data_problems(site: Path, root: Path, setup_cfg: Path) -> list[str]:
    """What is wrong with the data files the installed wheel holds under flexrank/<SHIPPED_FOLDERS>: files its
    RECORD lists that package_data does not name or that differ from (or are links instead of copies of) the
    top-level originals, and files package_data names that the wheel lacks."""
    record = next(site.glob("flexrank-*.dist-info")) / "RECORD"
    listed = {row[0] for row in csv.reader(record.read_text().splitlines()) if row}
    shipped = {p.removeprefix("flexrank/") for p in listed
               if p.startswith("flexrank/") and p.split("/")[1] in SHIPPED_FOLDERS}
    expected = package_data_files(root, setup_cfg)
    problems = [f"package_data names {name}, the wheel lacks it" for name in sorted(expected - shipped)]
    problems += [f"the wheel ships {name}, package_data does not name it" for name in sorted(shipped - expected)]
    for name in sorted(shipped & expected):
        installed = site / "flexrank" / name
        if installed.is_symlink() or not installed.is_file():
            problems.append(f"{name}: installed as {'a link' if installed.is_symlink() else 'no file'}")
        elif installed.read_bytes() != (root / name).read_bytes():
            problems.append(f"{name}: differs from the top-level original")
    # every file of the installed folders is one the RECORD lists (nothing else came with the wheel)
    on_disk = {p.relative_to(site / "flexrank").as_posix() for folder in SHIPPED_FOLDERS
               for p in (site / "flexrank" / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    problems += [f"{name}: installed but not in the wheel's RECORD" for name in sorted(on_disk - shipped)]
    return problems


def test_wheel_ships_every_package_data_file_identical_to_the_top_level_original(installed):
    """In a checkout, flexrank/recipes (and the other folders) are symlinks to the top-level folders, so only the
    wheel shows whether the files users install are the top-level ones, all of them."""
    *_, site = installed
    expected = package_data_files(ROOT, ROOT / "setup.cfg")
    assert {name.split("/")[0] for name in expected} == set(SHIPPED_FOLDERS)  # each glob group matched files
    assert {"recipes/analogy_shears.yaml", "recipes/nncf_shears_smollm2.json", "accelerate_configs/ddp.yaml",
            "ds_configs/zero3.json", "slurm/sweep.sbatch"} <= expected
    assert shipped_data_problems(site, ROOT, ROOT / "setup.cfg") == []
    # users' files only: the local test cluster (run as root, it rewrites /etc/hosts) stays in the repository
    record = next(site.glob("flexrank-*.dist-info")) / "RECORD"
    assert (ROOT / "slurm" / "local_cluster.sh").exists() and "local_cluster.sh" not in record.read_text()


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
