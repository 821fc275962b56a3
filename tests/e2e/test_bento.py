"""`openllm-clone build` makes a bento that serves the same answers from anywhere."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from openllm_clone.client import HTTPClient
from openllm_clone.testing import free_port
from tests.helpers import Server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT = "Tell me about the sea"


@pytest.fixture(scope="module")
def tiny_server(shared_tiny_server: Server) -> Server:
    """This module only sends requests: the session's shared server serves it."""
    return shared_tiny_server


@pytest.fixture(scope="module")
def bento(
    tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    ctx = tmp_path_factory.mktemp("docker") / "ctx"
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "openllm_clone",
            "build",
            str(tiny_model_dir),
            "--adapter-id",
            f"alpha={tiny_adapters['alpha']}",
            "--adapter-id",
            f"beta={tiny_adapters['beta']}",
            "--dtype",
            "float32",
            "--dockerfile-only",
            str(ctx),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"build took {time.perf_counter() - started:.1f} s")
    match = re.search(r"built (openllm-clone:\w+)", done.stdout)
    assert match, done.stdout
    return match.group(1), ctx


def _answers(url: str) -> dict[str | None, str]:
    with HTTPClient(url) as client:
        return {
            a: client.generate(PROMPT, adapter_name=a, max_new_tokens=12).outputs[0].text
            for a in (None, "alpha", "beta")
        }


def test_bento_serves_what_start_serves(
    bento: tuple[str, Path], tiny_server: Server, tmp_path: Path
) -> None:
    tag, _ = bento
    port = free_port()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    log = open(tmp_path / "bento.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", tag, "--host", "127.0.0.1", "--port", str(port)],
        cwd=elsewhere,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "bento.log").read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, (tmp_path / "bento.log").read_text()[-3000:]
            time.sleep(0.5)
        from_bento = _answers(url)
        from_start = _answers(tiny_server.url)
        assert from_bento == from_start
        assert len(set(from_bento.values())) == 3
        meta = httpx.get(f"{url}/v1/metadata", timeout=30).json()
        assert sorted(meta["adapters"]) == ["alpha", "beta"] and meta["dtype"] == "float32"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
        log.close()


def test_exported_dockerfile_is_complete(bento: tuple[str, Path]) -> None:
    _, ctx = bento
    dockerfile = (ctx / "env" / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.M)
    assert "pip install -r $BENTO_PATH/env/python/requirements.txt" in dockerfile
    assert re.search(r"^EXPOSE 3000", dockerfile, re.M)
    assert 'ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]' in dockerfile
    requirements = (ctx / "env" / "python" / "requirements.txt").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in requirements
    assert re.search(r"^torch==\d", requirements, re.M) and "bentoml==" in requirements
    assert (ctx / "src" / "openllm_clone" / "service.py").is_file()
    assert (ctx / "src" / "openllm_clone" / "runners" / "torch_runner.py").is_file()
    # the kernels' C++ sources, where the wheel puts them (built on the serving machine)
    assert (ctx / "src" / "openllm_clone" / "runners" / "csrc" / "ops.cpp").is_file()
    assert (ctx / "src" / "openllm_clone_settings.json").is_file()
    models = sorted(p.name for p in (ctx / "models").iterdir())
    assert models == ["adapter-alpha", "adapter-beta", "tiny-llama"]


@pytest.mark.skipif(
    subprocess.run(["docker", "info"], capture_output=True).returncode != 0
    if __import__("shutil").which("docker")
    else True,
    reason="no Docker daemon here",
)
def test_docker_builds_the_context(bento: tuple[str, Path]) -> None:  # pragma: no cover
    _, ctx = bento
    subprocess.run(
        ["docker", "build", "-f", str(ctx / "env/docker/Dockerfile"), str(ctx)], check=True
    )


def test_start_serves_a_bento_tag(
    bento: tuple[str, Path], tiny_server: Server, tmp_path: Path
) -> None:
    from openllm_clone.testing import run_server

    tag, _ = bento
    with run_server([tag], {}, tmp_path / "start-bento.log") as server:
        assert _answers(server.url) == _answers(tiny_server.url)


def test_bentos_list_prune_and_containerize_without_docker(bento: tuple[str, Path]) -> None:
    tag, _ = bento
    env = {**os.environ, "COLUMNS": "250"}
    listed = subprocess.run(
        [sys.executable, "-m", "openllm_clone", "bentos"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    assert tag in listed.stdout and "alpha,beta" in listed.stdout
    import bentoml

    from openllm_clone.bento import BuiltBento, build_bento, list_bentos, prune_bentos
    from openllm_clone.settings import Settings

    settings = Settings(
        model=bentoml.bentos.get(tag).info.labels["model"], dtype="float32", compile="on"
    )
    second: BuiltBento = build_bento(settings)
    # --compile is baked, and the image gets the C++ compiler Inductor needs.
    assert second.dockerfile.exists() and "g++" in second.dockerfile.read_text()
    assert bentoml.bentos.get(second.tag).info.labels["compile"] == "on"
    assert list_bentos()[0].tag == bentoml.bentos.get(second.tag).tag
    deleted = prune_bentos(keep=1)
    assert tag in deleted and all(str(b.tag) != tag for b in list_bentos())
    if (
        __import__("shutil").which("docker")
        and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    ):
        pytest.skip("a Docker daemon runs here")
    failed = subprocess.run(
        [
            sys.executable,
            "-m",
            "openllm_clone",
            "build",
            settings.model,
            "--dtype",
            "float32",
            "--containerize",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert failed.returncode != 0
    assert "no Docker daemon" in failed.stdout + failed.stderr
    assert "Dockerfile" in failed.stdout + failed.stderr
