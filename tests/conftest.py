"""Shared fixtures: a private BentoML home, a tiny model with adapters, a real server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Server, make_adapter, make_tiny_model, run_server, smollm2_tokenizer

# Servers and LLMs in tests run the eager step unless a test asks for --compile: with the
# default (auto) every new tiny model would start a background compile (~1 min of CPU
# each on 2 cores). tests/unit/test_compile.py covers auto, on and the cache.
os.environ.setdefault("OPENLLM_CLONE_COMPILE", "off")


@pytest.fixture(scope="session", autouse=True)
def bentoml_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test run gets its own model store (set before bentoml reads it)."""
    home = Path(
        os.environ.get("OPENLLM_CLONE_TEST_BENTOML_HOME") or tmp_path_factory.mktemp("bentoml")
    )
    old = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    yield home
    if old is None:
        os.environ.pop("BENTOML_HOME", None)
    else:
        os.environ["BENTOML_HOME"] = old


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """SmolLM2's tokenizer."""
    return smollm2_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A random 2-layer Llama folder with SmolLM2's tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", tokenizer)


@pytest.fixture(scope="session")
def tiny_adapters(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> dict[str, Path]:
    """Four real peft adapters for the tiny model (different seeds, ranks and targets)."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": make_adapter(tiny_model_dir, root / "alpha", seed=1, rank=8),
        "beta": make_adapter(tiny_model_dir, root / "beta", seed=2, rank=4),
        "gamma": make_adapter(
            tiny_model_dir, root / "gamma", seed=3, rank=16, targets=["q_proj", "v_proj"]
        ),
        "delta": make_adapter(
            tiny_model_dir,
            root / "delta",
            seed=4,
            rank=8,
            targets=["gate_proj", "up_proj", "down_proj"],
        ),
    }


@pytest.fixture(scope="session")
def trained_adapters(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> dict[str, Path]:
    """Adapters as people train them, for the tiny model: DoRA on every projection, and
    LoRA on q/v with the head and the embeddings trained and saved (modules_to_save)."""
    root = tmp_path_factory.mktemp("trained")
    return {
        "dora": make_adapter(tiny_model_dir, root / "dora", seed=11, rank=8, dora=True),
        "saved": make_adapter(
            tiny_model_dir,
            root / "saved",
            seed=12,
            rank=4,
            targets=["q_proj", "v_proj"],
            save=["lm_head", "embed_tokens"],
        ),
    }


def _tiny_server_args(tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> list[str]:
    return [
        str(tiny_model_dir),
        "--dtype",
        "float32",
        "--max-batch-size",
        "8",
        "--adapter-id",
        f"alpha={tiny_adapters['alpha']}",
        "--adapter-id",
        f"beta={tiny_adapters['beta']}",
        "--max-adapters",
        "3",
        "--kv-cache-mb",
        "64",
    ]


@pytest.fixture(scope="session")
def shared_tiny_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_adapters: dict[str, Path]
) -> Iterator[Server]:
    """One server as ``tiny_server`` for the modules that only send requests (others'
    clients and suites), so that each does not pay for a start of its own."""
    log = tmp_path_factory.mktemp("logs") / "shared-tiny-server.log"
    with run_server(_tiny_server_args(tiny_model_dir, tiny_adapters), {}, log) as server:
        yield server


@pytest.fixture(scope="session")
def shared_openai_client(shared_tiny_server: Server) -> Any:
    """The official openai SDK's client on the shared server (no retries: errors show)."""
    from openai import OpenAI

    return OpenAI(
        base_url=f"{shared_tiny_server.url}/v1", api_key="unused", max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
def tiny_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_adapters: dict[str, Path]
) -> Iterator[Server]:
    """A real server on the tiny model, with alpha and beta loaded at start-up."""
    log = tmp_path_factory.mktemp("logs") / "tiny-server.log"
    with run_server(_tiny_server_args(tiny_model_dir, tiny_adapters), {}, log) as server:
        yield server
