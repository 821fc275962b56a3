"""The packed linear kernel of the compiled step (runners/kernels.py) against float64
matrix products: every row count of a decode batch, odd sizes, both storage dtypes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from openllm_clone.runners import kernels

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
