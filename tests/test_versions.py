"""The versions flexrank claims are the ones it is tested with: setup.cfg's ranges hold the installed versions,
every dependency whose internals flexrank uses is pinned to the tested minor, and the README's tested-versions line
is what constraints.txt (and so CI) installs."""

import configparser
import re
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
INTERNALS_USED = ("torch", "transformers", "peft", "accelerate", "deepspeed", "nncf")  # tests/test_internals.py


def _requirements() -> dict[str, Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    lines += [line for extra in ("quant", "nncf", "deepspeed", "dev") for line in cfg["options.extras_require"][extra].splitlines()]
    reqs = [Requirement(line) for line in lines if line.strip() and not line.strip().startswith("#")]
    return {r.name: r for r in reqs}


def _constraints() -> dict[str, str]:
    pins = (line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#"))
    return {name.lower(): v for name, v in pins}


def _release(name: str) -> Version:
    return Version(Version(version(name)).base_version)  # torch 2.13.0+cpu -> 2.13.0


@pytest.mark.parametrize("name", sorted(_requirements()))
def test_setup_cfg_allows_the_installed_version(name):
    assert _requirements()[name].specifier.contains(_release(name), prereleases=True), \
        f"{name} {version(name)} is installed but setup.cfg says {_requirements()[name]}"


@pytest.mark.parametrize("name", INTERNALS_USED)
def test_a_dependency_whose_internals_are_used_is_pinned_to_the_tested_minor(name):
    installed = _release(name)
    spec = _requirements()[name].specifier
    upper = [s for s in spec if s.operator == "<"]
    next_minor = Version(f"{installed.major}.{installed.minor + 1}")
    assert upper and Version(upper[0].version) == next_minor, f"{name}: upper bound <{next_minor} expected, got {spec}"
    below = Version(f"{installed.major}.{installed.minor - 1}.999") if installed.minor else None
    assert below is None or not spec.contains(below), f"{name}: {spec} claims untested minor {below.major}.{below.minor}"


def test_the_readme_names_the_versions_ci_installs():
    said = re.search(r"Tested versions: (.*?) \(Python", (ROOT / "README.md").read_text(), re.S).group(1)
    named = dict(item.split() for item in " ".join(said.split()).split(", "))
    constraints = _constraints()
    for name, v in named.items():
        assert constraints[name] == v, f"README says {name} {v}, constraints.txt pins {constraints[name]}"
        assert str(_release(name)) == v, f"README says {name} {v}, {version(name)} is installed"
    assert set(INTERNALS_USED) <= set(named)
