"""A linear layer for decode steps on CPU: blocked weights, float32 math, bf16 storage.

``torch.ops.openllm_clone.linear_packed(x, w, n)`` computes ``x @ W.T`` for float32 rows
``x [M, K]`` (M is a decode batch: 1 to a few dozen) and a weight packed by
:func:`pack_weight` into blocks of 16 output features, ``[ceil(n / 16), K, 16]``,
stored as bfloat16 or float32. Each block is one sequential stream (the hardware
prefetcher's best case); each k step converts 16 weights to float32 once (a shift for
bfloat16) and multiplies them into up to six rows with fused multiply-adds, so the
weights are read once per step at any batch size.

Why: a decode step at batch 1 reads every weight once, so its speed is the weights'
bytes over the memory bandwidth. Most checkpoints (SmolLM2, Llama, Qwen, Gemma) are
stored in bfloat16; loaded as float32 their weights are exact bfloat16 values, so
keeping them in bfloat16 and computing in float32 gives float32's results from half
the bytes. Inductor's CPU GEMM template has no float32-activation, bfloat16-weight
kernel (its bf16 kernels round the activations to bf16), and its float32 micro-GEMM
reached ~80 GFLOP/s at 16 rows on 2 AVX2 cores where this one reaches 115-135, and
at one row it streams the weights at ~33 GB/s, two blocks per pass (the numbers are in
the README).

``torch.ops.openllm_clone.linear_quant(x, w, n)`` does the same for weights whose float32
values are exactly GGUF Q4_1 or Q8_0 blocks (a checkpoint converted from a GGUF file, as
the embedded SmolLM2 is: Q4_1 projections, a Q8_0 embedding), found by
:func:`pack_quant` and kept as those blocks: 5 or 8.5 bits a weight instead of 32. At
more rows each block is rebuilt once into float32 in cache, each weight exactly (``d *
q + m`` with one rounding, as GGUF's own dequantizer), and the float32 passes read it
there in the float32 kernel's order: the float32 kernel's bits. At one row (bound by
the arithmetic, not by memory: SmolLM2's projections read ~95 MB a step instead of
540 MB) the quants are multiplied into the row and each group's scale and offset are
applied once, ``d * sum(q x) + m * sum(x)`` as llama.cpp does but in float32 (within
float32 rounding of the float32 kernel): one FMA a weight instead of a rebuild and an
FMA, 19 % less time.

The C++ lives in the repository's ``csrc/`` (``linear.cpp``: these two ops; ``attention.cpp``: paged
attention; ``lora.cpp``: grouped LoRA with DoRA's rescale; ``ops.cpp``: the
registration; ``vec.h``: shared vector helpers), formatted by clang-format and built with
``-Wall -Wextra`` by :func:`torch.utils.cpp_extension.load` into the compile cache beside
the AOTInductor package that calls it (~30 s, once), and loaded from there by later
starts before the package. This module declares the ops' schemas and fake kernels. AVX2, FMA and F16C (x86-64) only: elsewhere
:func:`available` is False and the compiled step keeps ``F.linear``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from openllm_clone._layout import csrc_folder

__all__ = [
    "CSRC",
    "QUANT_FORMATS",
    "available",
    "bf16_exact",
    "build",
    "enabled",
    "load",
    "loaded",
    "pack_quant",
    "pack_weight",
    "source_digest",
]

logger = logging.getLogger(__name__)

BLOCK = 16  # output features per packed block (two AVX2 vectors)


# The C++ sources: one file per op or family of ops, and the header they share.
CSRC = Path(csrc_folder(os.path.dirname(os.path.abspath(__file__))))
_SOURCES = ("linear.cpp", "attention.cpp", "lora.cpp", "ops.cpp")
_HEADERS = ("vec.h",)


def source_digest() -> str:
    """sha256 of every C++ file (names and contents): the library's name and part of the
    compile cache's key, so a changed kernel is rebuilt and the packages that call it
    recompiled."""
    digest = hashlib.sha256()
    for name in (*_SOURCES, *_HEADERS):
        digest.update(name.encode() + b"\0" + (CSRC / name).read_bytes() + b"\0")
    return digest.hexdigest()


_NAME = "openllm_clone_kernels_" + source_digest()[:12]
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-Wall", "-Wextra"]

# The op's schema and shape function live here, so export can trace it before any
# build, and the C++ library only registers the CPU kernel.
_lib = torch.library.Library("openllm_clone", "DEF")
_lib.define("linear_packed(Tensor x, Tensor w, int n) -> Tensor")


_lib.define("linear_quant(Tensor x, Tensor w, int n) -> Tensor")
_lib.define(
    "paged_attention(Tensor q, Tensor cache, Tensor idx, Tensor lens, int window, float scale)"
    " -> Tensor"
)
_lib.define(
    "lora_bgmv_(Tensor(a!) y, Tensor x, Tensor a, Tensor b, Tensor g, Tensor c, Tensor slots,"
    " int offset) -> ()"
)


@torch.library.register_fake("openllm_clone::linear_packed")
def _linear_packed_fake(x: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], n))


@torch.library.register_fake("openllm_clone::linear_quant")
def _linear_quant_fake(x: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], n))


@torch.library.register_fake("openllm_clone::paged_attention")
def _paged_attention_fake(
    q: torch.Tensor,
    cache: torch.Tensor,
    idx: torch.Tensor,
    lens: torch.Tensor,
    window: int,
    scale: float,
) -> torch.Tensor:
    return q.new_empty(q.shape)


@torch.library.register_fake("openllm_clone::lora_bgmv_")
def _lora_bgmv_fake(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    c: torch.Tensor,
    slots: torch.Tensor,
    offset: int,
) -> None:
    return None


_loaded: Path | None = None


def available() -> bool:
    """True on an x86-64 CPU with AVX2 and FMA (what the kernel is written for), with
    ninja to build it (a dependency of the package)."""
    from torch.utils.cpp_extension import is_ninja_available

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    _ninja_on_path()
    return bool(is_ninja_available())


def enabled() -> bool:
    """:func:`available`, unless ``OPENLLM_CLONE_PACKED_LINEAR=0`` turns the kernel off
    (the compiled step then runs ``F.linear``). Part of the compile cache's key."""
    return os.environ.get("OPENLLM_CLONE_PACKED_LINEAR", "1") != "0" and available()


def _ninja_on_path() -> None:
    """torch looks for ``ninja`` on PATH; the pip package's binary sits in the
    environment's bin folder, which is not on PATH when the server was started by the
    full path of its script (``.venv/bin/openllm-clone``)."""
    try:
        import ninja  # type: ignore[import-untyped]

        folder = str(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        folder = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if folder not in path.split(os.pathsep):
        os.environ["PATH"] = folder + (os.pathsep + path if path else "")


def loaded() -> bool:
    return _loaded is not None


def _library(folder: Path) -> Path:
    return folder / f"{_NAME}.so"


def build(folder: Path, *, strict: bool = False) -> Path:
    """Compile the kernels (``csrc/``) into ``folder`` (reused when already there) and load
    them; ``strict``: warnings are errors (the tests build so)."""
    global _loaded
    from torch.utils.cpp_extension import load as load_extension

    library = _library(folder)
    if not library.exists():
        _ninja_on_path()
        folder.mkdir(parents=True, exist_ok=True)
        if _loaded is not None:  # built for another package in this process: same code
            shutil.copyfile(_loaded, library)
        else:
            logger.info("building the CPU kernels in %s", folder)
            load_extension(
                name=_NAME,
                sources=[str(CSRC / name) for name in _SOURCES],
                extra_cflags=[*_FLAGS, *(["-Werror"] if strict else [])],
                extra_include_paths=[str(CSRC)],
                extra_ldflags=["-fopenmp"],
                build_directory=str(folder),
                is_python_module=False,
                verbose=False,
            )
            _loaded = library  # torch loaded it
    return load(folder)


def load(folder: Path) -> Path:
    """Load the kernel built by :func:`build` in ``folder`` (once per process: every
    build of the same source registers the same kernel)."""
    global _loaded
    library = _library(folder)
    if _loaded is None:
        if not library.exists():
            raise FileNotFoundError(f"no packed linear kernel in {folder}")
        torch.ops.load_library(str(library))
        _loaded = library
    return _loaded


def pack_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[n, K]`` -> ``[ceil(n / 16), K, 16]`` in ``dtype`` (rows past n are zeros)."""
    n, k = weight.shape
    blocks = -(-n // BLOCK)
    padded = torch.zeros(blocks * BLOCK, k, dtype=dtype)
    padded[:n] = weight.detach().to(dtype)
    return padded.view(blocks, BLOCK, k).transpose(1, 2).contiguous()


def bf16_exact(weights: list[torch.Tensor]) -> bool:
    """True when every weight is a bfloat16 value (a bf16 checkpoint loaded as float32):
    stored in bfloat16 they give float32's results exactly."""
    for w in weights:
        w = w.detach()
        if w.dtype == torch.bfloat16:
            continue
        if not torch.equal(w.to(torch.bfloat16).to(w.dtype), w):
            return False
    return True


QUANT_FORMATS = {320: "q4_1", 544: "q8_0"}  # bytes per (16 features, 32 k) -> format
_GROUP = 32


def pack_quant(weight: torch.Tensor) -> torch.Tensor | None:
    """``[n, K]`` weights whose values are exactly GGUF Q4_1 or Q8_0 blocks (a
    checkpoint dequantized from such a GGUF, as the embedded SmolLM2 is) packed for
    ``linear_quant`` (see the kernel source for the layout); None when they are not,
    or K is not a multiple of 32. Q4_1 is tried first (5 bits a weight, 8.5 for Q8_0)."""
    w = weight.detach()
    if w.dim() != 2 or w.shape[1] % _GROUP or not w.is_floating_point():
        return None
    w = w.float()
    found = _find_q4_1(w)
    if found is not None:
        return _pack_groups(found[0], [found[1], found[2]], nibbles=True)
    found8 = _find_q8_0(w)
    if found8 is not None:
        return _pack_groups(found8[0], [found8[1]], nibbles=False)
    return None


def _fp16_exact(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.half().float(), t))


def _find_q4_1(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(q uint8 [n, K], d fp16 [n, G], m fp16 [n, G]) with ``d * q + m == w`` in float32
    for every weight, or None. m is each group's minimum (its q is 0); d is found from
    the maximum (q 15, as GGUF's quantizer makes it), or a float16 step either side."""
    g = w.view(w.shape[0], -1, _GROUP)
    m = g.amin(-1)
    if not _fp16_exact(m):
        return None
    span = g.amax(-1) - m
    base = (span / 15).half()
    bits = base.view(torch.int16)
    q_found = torch.zeros(g.shape, dtype=torch.uint8)
    d_found = torch.zeros_like(base)
    done = span == 0  # constant groups: q 0, d 0, m the value
    for step in (0, 1, -1):
        d16 = (bits + step).clamp(min=0).view(torch.float16)
        d = d16.float().unsqueeze(-1)
        q = torch.where(d > 0, (g - m.unsqueeze(-1)) / d, 0.0).round_().clamp_(0, 15)
        ok = ((q * d + m.unsqueeze(-1)) == g).all(-1) & ~done
        q_found[ok] = q[ok].to(torch.uint8)
        d_found[ok] = d16[ok]
        done |= ok
        if bool(done.all()):
            return q_found.view(w.shape), d_found, m.half()
    return None


def _find_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q int8 [n, K], d fp16 [n, G]) with ``d * q == w`` in float32, or None; d is each
    group's largest magnitude over 127 (as GGUF's quantizer makes it)."""
    g = w.view(w.shape[0], -1, _GROUP)
    d = g.abs().amax(-1) / 127
    if not _fp16_exact(d):
        return None
    dd = d.unsqueeze(-1)
    q = torch.where(dd > 0, g / dd, 0.0).round_()
    if bool((q.abs() > 127).any()) or not torch.equal(q * dd, g):
        return None
    return q.to(torch.int8).view(w.shape), d.half()


def _pack_groups(q: torch.Tensor, scales: list[torch.Tensor], *, nibbles: bool) -> torch.Tensor:
    """q [n, K] and float16 scales [n, G] -> uint8 [ceil(n / 16), G, bytes]: per block of
    16 features and group of 32 k, the quants as [32 k][16 features] (two per byte, low
    nibble feature j and high j + 8, when ``nibbles``), then each scale's 16 values."""
    n, k = q.shape
    blocks, groups = -(-n // BLOCK), k // _GROUP
    pad = blocks * BLOCK - n
    qp = torch.cat([q, q.new_zeros(pad, k)]) if pad else q
    qp = qp.view(blocks, BLOCK, groups, _GROUP).permute(0, 2, 3, 1)  # [b, G, 32, 16]
    if nibbles:
        body = (qp[..., :8] | (qp[..., 8:] << 4)).contiguous().view(torch.uint8)
    else:
        body = qp.contiguous().view(torch.uint8)
    parts = [body.reshape(blocks, groups, -1)]
    for s in scales:
        sp = torch.cat([s, s.new_zeros(pad, groups)]) if pad else s
        sp = sp.view(blocks, BLOCK, groups).permute(0, 2, 1).contiguous()  # [b, G, 16]
        parts.append(sp.view(torch.uint8).reshape(blocks, groups, 2 * BLOCK))
    return torch.cat(parts, dim=-1).contiguous()
