"""The packed linear kernel of the compiled step (runners/kernels.py) against float64
matrix products: every row count of a decode batch, odd sizes, both storage dtypes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from openllm_clone.runners import kernels

from tests.helpers import gguf_values

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs an AVX2 x86-64 CPU")


@pytest.fixture(scope="module")
def op(tmp_path_factory: pytest.TempPathFactory) -> object:
    kernels.build(tmp_path_factory.mktemp("kernels"))
    return torch.ops.openllm_clone.linear_packed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_packed_equals_a_float64_matmul(op: object, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    # n: one partial block, several, an odd count of blocks (the one-row path pairs them)
    for n, k in ((7, 13), (50, 64), (1000, 96), (48, 577)):
        w = torch.randn(n, k, generator=gen).to(dtype).float()  # exact in either dtype
        packed = kernels.pack_weight(w, dtype)
        assert packed.shape == (-(-n // 16), k, 16) and packed.dtype == dtype
        for m in (1, 2, 3, 4, 5, 16):
            x = torch.randn(m, k, generator=gen)
            y = op(x, packed, n)  # type: ignore[operator]
            assert y.shape == (m, n) and y.dtype == torch.float32
            ref = (x.double() @ w.double().t()).float()
            torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


def test_bf16_exact_tells_bf16_values_from_others() -> None:
    w = torch.randn(8, 8)
    assert not kernels.bf16_exact([w])
    assert kernels.bf16_exact([w.bfloat16().float(), w.bfloat16()])


def test_a_second_folder_gets_the_loaded_build(op: object, tmp_path: Path) -> None:
    """One build per process: another package's folder gets a copy, not a second load."""
    kernels.build(tmp_path)
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]
    assert kernels.loaded()


@pytest.mark.parametrize(("fmt", "size"), [("q4_1", 320), ("q8_0", 544)])
def test_gguf_blocks_are_found_and_multiply_as_the_float32_weights(
    op: object, fmt: str, size: int
) -> None:
    """Float32 weights that are exactly GGUF Q4_1 / Q8_0 blocks are stored as those blocks
    (5 / 8.5 bits a weight) and ``linear_quant`` gives float64's result within float32
    rounding; from two rows on (weights rebuilt exactly, summed in the float32 kernel's
    order) the float32 kernel's very bits."""
    gen = torch.Generator().manual_seed(1)
    for n, k in ((7, 32), (50, 64), (1000, 96), (48, 576)):
        w = gguf_values(torch.randn(n, k, generator=gen) * 0.05, fmt)
        w[0, :32] = gguf_values(torch.full((1, 32), 0.03), fmt)  # a constant group
        quant = kernels.pack_quant(w)
        assert quant is not None and quant.dtype == torch.uint8
        assert quant.shape == (-(-n // 16), k // 32, size)
        assert kernels.QUANT_FORMATS[size] == fmt
        dense = kernels.pack_weight(w, torch.float32)
        for m in (1, 2, 3, 4, 5, 16):
            x = torch.randn(m, k, generator=gen)
            y = torch.ops.openllm_clone.linear_quant(x, quant, n)
            dense_y = op(x, dense, n)  # type: ignore[operator]
            if m > 1:
                assert torch.equal(y, dense_y)
            ref = (x.double() @ w.double().t()).float()
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(dense_y, ref, atol=1e-5, rtol=1e-5)


def test_other_weights_are_not_taken_for_gguf_blocks() -> None:
    """Nothing lossy: random float32, bfloat16 values, K not a multiple of 32, and a
    Q4_1 matrix with one value moved by one float32 step all stay unquantized."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=gen)
    assert kernels.pack_quant(w) is None
    assert kernels.pack_quant(w.bfloat16().float()) is None
    assert kernels.pack_quant(gguf_values(w, "q4_1")[:, :48]) is None
    nudged = gguf_values(w, "q4_1")
    assert kernels.pack_quant(nudged) is not None
    nudged[5, 17] = torch.nextafter(nudged[5, 17], torch.tensor(1.0))
    assert kernels.pack_quant(nudged) is None


def _attention_reference(
    q: torch.Tensor, cache: torch.Tensor, idx: torch.Tensor, lens: torch.Tensor, window: int
) -> torch.Tensor:
    """Row by row in float64: softmax over the row's own context (its last ``window``)."""
    heads, kv_heads = q.shape[1], cache.shape[2]
    out = torch.empty_like(q)
    for t in range(q.shape[0]):
        n = int(lens[t])
        lo = max(0, n - window) if window else 0
        kv = cache[idx[t, lo:n]].double()  # [L, 2, KV, D]
        k = kv[:, 0].repeat_interleave(heads // kv_heads, dim=1)
        v = kv[:, 1].repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[t].double(), k) * 0.125
        out[t] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v).float()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_reads_each_rows_context_in_place(op: object, dtype: torch.dtype) -> None:
    """Grouped heads, a head size off the vector width, sliding windows, rows of one
    token (decode) and rows of different lengths (prompt tokens); contexts past eight
    positions (scored eight at a time) with a remainder."""
    gen = torch.Generator().manual_seed(2)
    for rows, heads, kv_heads, dim, window in (
        (1, 9, 3, 64, 0),
        (7, 4, 2, 20, 0),
        (5, 8, 8, 256, 3),
        (16, 6, 2, 64, 5),
        (6, 8, 2, 128, 17),  # eight positions at a time, windowed, two passes over d
        (3, 4, 1, 72, 0),  # d past 64 in a short second pass
    ):
        cache = torch.randn(300, 2, kv_heads, dim, generator=gen).to(dtype)
        idx = torch.randint(0, 300, (rows, 40), generator=gen)
        lens = torch.randint(1, 41, (rows,), generator=gen)
        q = torch.randn(rows, heads, dim, generator=gen)
        got = torch.ops.openllm_clone.paged_attention(q, cache, idx, lens, window, 0.125)
        want = _attention_reference(q, cache, idx, lens, window)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="lens out of range"):
        torch.ops.openllm_clone.paged_attention(q, cache, idx, lens + 40, 0, 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_bgmv_adds_each_rows_adapter_in_place(op: object, dtype: torch.dtype) -> None:
    """Each row's delta ``(A[s] x) B[s]`` in float32, added in place to its columns of a
    fused output, then DoRA's rescale ``* g[s] + c[s]`` (slots 2 and 4 here; ones and
    zeros for the others); rows of slot 0 and the other columns are left as they were."""
    gen = torch.Generator().manual_seed(3)
    eleven = [2] * 11  # one adapter's rows past a unit of eight
    for slots, rank, size_in, size_out, offset, width in (
        ([0, 1, 2, 3, 4, 0, 4, 4, 1], 8, 40, 24, 4, 30),
        ([3, *eleven, 0, 1, 3, 2, 0, 4, 1, 1, 3], 3, 37, 75, 2, 80),  # tails past 16 / 32
    ):
        a = torch.randn(5, rank, size_in, generator=gen).to(dtype)
        b = torch.randn(5, rank, size_out, generator=gen).to(dtype)
        a[0], b[0] = 0, 0
        g = torch.ones(5, size_out)
        c = torch.zeros(5, size_out)
        for dora in (2, 4):
            g[dora] = 1 + 0.1 * torch.randn(size_out, generator=gen)
            c[dora] = torch.randn(size_out, generator=gen)
        rows = torch.tensor(slots)
        x = torch.randn(len(slots), size_in, generator=gen)
        y = torch.randn(len(slots), width, generator=gen)
        got = y.clone()
        torch.ops.openllm_clone.lora_bgmv_(got, x, a, b, g, c, rows, offset)
        xa = torch.bmm(a[rows].double(), x.double().unsqueeze(-1)).transpose(1, 2)
        want = y.clone()
        end = offset + size_out
        delta = torch.bmm(xa, b[rows].double()).squeeze(1)
        scaled = (y[:, offset:end].double() + delta) * g[rows].double() + c[rows].double()
        want[:, offset:end] = scaled.float()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        assert torch.equal(got[rows == 0], y[rows == 0])
        assert torch.equal(got[:, :offset], y[:, :offset]) and torch.equal(got[:, end:], y[:, end:])
    with pytest.raises(RuntimeError, match="out within y"):
        torch.ops.openllm_clone.lora_bgmv_(got, x, a, b, g, c, rows, width - size_out + 1)
    with pytest.raises(RuntimeError, match="g and c must be"):
        torch.ops.openllm_clone.lora_bgmv_(got, x, a, b, g[:, 1:], c, rows, offset)


def test_stages_split_the_layers_by_the_weights_they_read() -> None:
    """--step-stages: contiguous spans of about equal cost, the head counted in the last
    layer's (SmolLM2's shapes: its head reads as much as ~8 of its 30 layers), at least
    one layer each."""
    from types import SimpleNamespace

    from openllm_clone.runners.compiled import DecodeGraph

    smollm2 = SimpleNamespace(
        span=(0, 30, 30),
        num_heads=9,
        head_dim=64,
        embed=SimpleNamespace(weight=torch.empty(49152, 576)),
        n_qkv=576 + 2 * 192,
        n_o=576,
        n_gate_up=2 * 1536,
        n_down=576,
        n_head=49152,
    )
    split = DecodeGraph.stage_spans
    assert split(smollm2, 1) == [(0, 30)]  # type: ignore[arg-type]
    assert split(smollm2, 4) == [(0, 9), (9, 19), (19, 28), (28, 30)]  # type: ignore[arg-type]
    spans = split(smollm2, 40)  # type: ignore[arg-type]
    assert spans == [(i, i + 1) for i in range(30)]
    tiny = SimpleNamespace(**{**vars(smollm2), "span": (0, 2, 2), "n_head": 100})
    assert split(tiny, 2) == split(tiny, 3) == [(0, 1), (1, 2)]  # type: ignore[arg-type]


def test_the_kernels_build_with_warnings_as_errors(tmp_path: Path) -> None:
    """csrc/ compiles with -Wall -Wextra -Werror (in a fresh process: this one has
    the library loaded), and every file of it is in the digest that names the library and
    keys the compile cache."""
    import subprocess
    import sys

    sources = sorted(p.name for p in kernels.CSRC.iterdir() if p.suffix in (".cpp", ".h"))
    assert sources == sorted((*kernels._SOURCES, *kernels._HEADERS))
    code = (
        "import sys; from pathlib import Path; from openllm_clone.runners import kernels; "
        "kernels.build(Path(sys.argv[1]), strict=True)"
    )
    built = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=1200
    )
    assert built.returncode == 0, built.stderr[-4000:]
    assert (tmp_path / f"{kernels._NAME}.so").is_file()
