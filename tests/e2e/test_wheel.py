"""The built distribution, as a user installs it: every subpackage in the wheel, and a
plain (non-editable) install of it into a fresh virtual environment serves a request."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest

from openllm_clone._layout import PACKAGE_ROOTS
from openllm_clone.testing import run_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _source_modules() -> set[str]:
    """Every .py file under the mapped folders, as its path inside the wheel."""
    found = set()
    for name, folder in PACKAGE_ROOTS.items():
        base = ROOT / folder
        for file in base.rglob("*.py"):
            if "__pycache__" in file.parts:
                continue
            rel = file.relative_to(base)
            found.add("/".join([*name.split("."), *rel.parts]))
    return found


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist and the wheel, built with setuptools' PEP 517 hooks from a copy of this
    tree (the files git would commit: no stale build/ folder can leak into the wheel)."""
    out = tmp_path_factory.mktemp("dist")
    tree = tmp_path_factory.mktemp("tree")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    for rel in listed.stdout.splitlines():
        if (ROOT / rel).is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, tree / rel)
    # The hooks print setuptools' progress on stdout: the names go to a file of their own.
    # (build_meta rewrites sys.argv while it runs: read the arguments first.)
    code = (
        "import sys, pathlib; out, names = sys.argv[1:3]; from setuptools import build_meta as b; "
        "built = [b.build_sdist(out), b.build_wheel(out)]; "
        "pathlib.Path(names).write_text(' '.join(built))"
    )
    names = tmp_path_factory.mktemp("names") / "names"
    done = subprocess.run(
        [sys.executable, "-c", code, str(out), str(names)],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    sdist, wheel = names.read_text().split()
    return {"sdist": out / sdist, "wheel": out / wheel}


def test_wheel_holds_every_module_of_the_source_tree(dist: dict[str, Path]) -> None:
    names = set(zipfile.ZipFile(dist["wheel"]).namelist())
    in_wheel = {n for n in names if n.endswith(".py")}
    expected = _source_modules()
    assert "openllm_clone/runners/quantization/__init__.py" in expected
    assert expected - in_wheel == set(), "modules missing from the wheel"
    assert in_wheel - expected == set(), "modules in the wheel that the tree lacks"
    # Every folder holding modules is a package (an __init__.py), so imports find it.
    folders = {n.rsplit("/", 1)[0] for n in in_wheel}
    assert {f for f in folders if f"{f}/__init__.py" not in in_wheel} == set()


def test_sdist_rebuilds_the_same_wheel_contents(dist: dict[str, Path], tmp_path: Path) -> None:
    with tarfile.open(dist["sdist"]) as tar:
        tar.extractall(tmp_path, filter="data")
    (src,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (src / "setup.py").is_file() and (src / "openllm_clone" / "_layout.py").is_file()
    out = tmp_path / "wheel"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (rebuilt,) = out.glob("*.whl")
    py = {n for n in zipfile.ZipFile(rebuilt).namelist() if n.endswith(".py")}
    assert py == {n for n in zipfile.ZipFile(dist["wheel"]).namelist() if n.endswith(".py")}


def test_plain_install_of_the_wheel_serves(
    dist: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    import torch

    # The same torch build as here (the CPU one); everything else as the wheel declares it.
    torch_spec = f"torch=={torch.__version__.split('+')[0]}"
    done = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-compile", torch_spec, str(dist["wheel"])],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    def run_code(code: str, **env: str) -> str:
        """``code`` in the installed venv, outside this tree; its stdout."""
        done = subprocess.run(
            [python, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={**os.environ, **env},
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    where = run_code("import openllm_clone.runners.quantization as q; print(q.__file__)")
    assert str(venv) in where and str(ROOT) not in where
    # What the compiled step's kernel needs to build came with the install (ninja, found
    # without the venv's bin folder on PATH).
    from openllm_clone.runners import kernels

    probe = run_code(
        "from openllm_clone.runners import kernels; print(kernels.available())",
        PATH="/usr/local/bin:/usr/bin:/bin",
    )
    assert probe.strip() == str(kernels.available())
    args = [str(tiny_model_dir), "--dtype", "float32", "--kv-cache-mb", "16"]
    env = {"PYTHONPATH": "", "BENTOML_HOME": str(tmp_path / "bentoml")}
    with run_server(args, env, tmp_path / "server.log", python=python, cwd=tmp_path) as server:
        r = httpx.post(
            f"{server.url}/v1/completions",
            timeout=120,
            json={"model": "tiny-llama", "prompt": "Hello", "max_tokens": 4, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == 4
        assert body["choices"][0]["finish_reason"] == "length"
        assert os.path.getsize(server.log) > 0
