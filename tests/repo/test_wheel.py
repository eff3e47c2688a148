"""The wheel as users get it: what it holds, and that it works installed on its own.

The wheel is built (no network: ``--no-build-isolation --no-index``) from a copy of the
files pyproject.toml names, so the build leaves nothing in the working tree. It is
installed into a fresh venv with ``--no-deps``; the dependencies come from the dev
venv's site-packages through a ``.pth`` line naming a folder of links to everything
there but rankd itself, so the only rankd that venv can see is the wheel's. From a
folder outside the repository, that venv must import ``rankd.*`` only, and pytest
there must load the ``rankd`` plugin through the wheel's entry point and run a
2-node x 2-rank job with the ``rankd_cluster`` fixture.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

pytestmark = pytest.mark.timeout(180)


def _run(argv: list[str], *, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with an environment that points at no other rankd."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTEST_ADDOPTS", "PYTEST_PLUGINS"}
    }
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return done


def _source_copy(dest: Path) -> Path:
    """The files the build reads: pyproject.toml, its readme, the package folders."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = {"pyproject.toml", config["project"]["readme"]}
    names |= {d.split("/")[0] for d in config["tool"]["setuptools"]["package-dir"].values()}
    names |= {p.name for p in ROOT.glob("LICEN[CS]E*")}
    for name in sorted(names):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = _source_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("dist")
    argv = [PY, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    done = _run([*argv, "-q", "-w", str(out), str(src)], cwd=out)
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("rankd-*.whl")
    return built


def test_the_wheel_holds_rankd_alone(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        (info,) = {n.split("/")[0] for n in names if ".dist-info/" in n}
        entry_points = configparser.ConfigParser()
        entry_points.read_string(whl.read(f"{info}/entry_points.txt").decode())
    assert {n.split("/")[0] for n in names} == {"rankd", info}
    assert info.startswith("rankd-") and info.endswith(".dist-info")
    for required in ("rankd/py.typed", "rankd/v1/agent.proto", "rankd/v1/agent_pb2.pyi"):
        assert required in names
    for package in ("rankd", "rankd/v1", "rankd/agent", "rankd/client", "rankd/testing"):
        assert f"{package}/__init__.py" in names
    assert "rankd/testing/plugin.py" in names
    assert not [n for n in names if "__pycache__" in n or n.startswith("rankd/tests")]
    assert dict(entry_points["console_scripts"]) == {
        "rankd": "rankd.client.cli:main",
        "rankd-agent": "rankd.agent.server:main",
    }
    assert dict(entry_points["pytest11"]) == {"rankd": "rankd.testing.plugin"}


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed and the dev venv's other packages visible."""
    home = tmp_path_factory.mktemp("venv")
    done = _run([PY, "-m", "venv", str(home)], cwd=home)
    assert done.returncode == 0, done.stderr
    python = home / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)]
    done = _run(install, cwd=home)
    assert done.returncode == 0, done.stdout + done.stderr
    # The dependencies (and pytest): links to the dev site-packages but its rankd. A plain
    # path line in a .pth file runs none of the .pth files of that folder, so the dev
    # venv's editable finder stays out as well.
    deps = tmp_path_factory.mktemp("deps")
    dev = Path(sysconfig.get_paths()["purelib"])
    for entry in dev.iterdir():
        if not entry.name.startswith(("rankd", "__editable__")) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([str(python), "-c", purelib], cwd=home).stdout.strip())
    assert site.is_relative_to(home), site
    (site / "dev-deps.pth").write_text(f"{deps}\n")
    return home


CHECK = """
import importlib, importlib.metadata, json
import rankd
from rankd.v1 import agent_pb2
import rankd.agent.server, rankd.client, rankd.testing
missing = []
for name in ("agent", "client", "protos", "testing"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        missing.append(name)
dists = [d for d in importlib.metadata.distributions() if d.metadata["Name"] == "rankd"]
print(json.dumps({
    "rankd": rankd.__file__,
    "proto": agent_pb2.DESCRIPTOR.name,
    "missing": missing,
    "dists": [str(d.locate_file("")) for d in dists],
    "pytest11": [e.value for e in dists[0].entry_points if e.group == "pytest11"],
}))
"""


def test_the_installed_wheel_imports_rankd_only(venv: Path, tmp_path: Path) -> None:
    done = _run([str(venv / "bin" / "python"), "-c", CHECK], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert Path(found["rankd"]).is_relative_to(venv), found["rankd"]
    assert found["proto"] == "rankd/v1/agent.proto"
    assert found["missing"] == ["agent", "client", "protos", "testing"]
    (dist,) = found["dists"]  # the wheel's, and no other
    assert Path(dist).is_relative_to(venv)
    assert found["pytest11"] == ["rankd.testing.plugin"]


USER_TEST = """
import sys

SHOW = (
    "import os; e = os.environ; "
    "print('env', e['RANK'], e['WORLD_SIZE'], e['LOCAL_RANK'], e['GROUP_RANK'])"
)


def test_two_nodes_two_ranks(rankd_cluster, capsys):
    cluster = rankd_cluster(nodes=2)
    result = cluster.launch([sys.executable, "-c", SHOW], nproc_per_node=2)
    assert result.world_size == 4
    merged = capsys.readouterr().out.splitlines()  # launch prints each line, prefixed
    assert sorted(merged) == [f"[default{r}]:env {r} 4 {r % 2} {r // 2}" for r in range(4)]
"""


def test_pytest_loads_the_plugin_from_the_wheel(venv: Path, tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(USER_TEST)
    argv = [str(venv / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider"]
    done = _run([*argv, "--trace-config", "test_user.py"], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout, done.stdout
    plugin = venv / "lib"  # .../lib/python3.X/site-packages/rankd/testing/plugin.py
    registered = [
        line for line in done.stdout.splitlines() if "module 'rankd.testing.plugin'" in line
    ]
    assert len(registered) == 1, done.stdout
    assert f"from '{plugin}" in registered[0] and "rankd/testing/plugin.py" in registered[0]
