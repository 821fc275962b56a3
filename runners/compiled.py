"""The decode step as one ``torch.compile`` graph per batch size (``--compile``, CPU).

A batch-1 bf16 decode step in eager PyTorch on CPU is ~120 matrix-vector products
(oneDNN reaches ~19 GB/s on SmolLM2's narrow 576-wide layers, against ~30 GB/s for
wide ones) plus ~1,500 small ops at 2-5 us each. Compiled with Inductor's freezing
and max-autotune, the projections run in Inductor's C++ AMX/AVX-512 micro-GEMMs on
prepacked weights and the norms, rotary and activations fuse into a few loops:
measured on this 2-core CPU for SmolLM2 bf16, batch 1 25.3 -> 15.3 ms a step and
batch 16 ~34 -> 23.6 ms (see bench/serving.py).

What the graph covers: decode steps (one new token per row) with no adapter rows.
The paged KV cache stays the runner's: the graph writes each row's new key/value
into its slot (an in-place ``index_put_`` on the cache, which Inductor keeps in
place) and gathers the row's context by flat cache index, so the cache layout,
the block allocator and prefix sharing are unchanged. Prompt chunks and steps with
adapters run the runner's eager code on the same weights.

Shapes: the number of rows is padded to a bucket (1, 4, 16, 64, ... up to the
largest batch) and compiled once per bucket; the context length is a dynamic
dimension, padded to whole KV blocks. Padding rows read the zeroed null block and
write a scratch slot that no sequence owns.

Cost: compiling takes ~35-40 s per bucket on 2 cores for SmolLM2, at every start
(Inductor's FX cache bypasses graphs holding oneDNN-packed weights: "mkldnn tensors
unpickleable"; with ``cpp.weight_prepack`` off the graph caches, but the GEMMs fall
back to ``aten::mm`` and the gain is gone), and the prepacked weights are a second copy
of the projections (+1x weight memory).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import torch
import torch._inductor.config as _inductor_config
import torch.nn.functional as F

from openllm_clone.errors import ModelLoadError

__all__ = ["CompiledDecoder", "CompiledHead", "DecodeGraph", "buckets_for", "rms_norm", "rope"]

logger = logging.getLogger(__name__)

_INDUCTOR_OPTIONS = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
}


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with rotate_half as a roll times a sign.

    ``rotate_half(x) = cat(-x2, x1) = roll(x, D/2) * [-1.., +1..]``; the sign is folded
    into ``sin_signed`` once per step, so each layer runs four ops instead of seven,
    with the same bf16 roundings as the model's own code. Shared by the eager step and
    the compiled graph.
    """
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as one ``F.rms_norm`` call (the HF module is seven ops, same math).

    bf16 inputs are normalised in float32, rounded, then scaled, in the model's own
    order: ``F.rms_norm`` straight on bf16 rounds differently, and over 30 layers
    SmolLM2 stopped answering. Shared by the eager step and the compiled graph.
    """
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype).mul_(weight)


def buckets_for(max_batch_size: int) -> list[int]:
    """Row counts compiled for: powers of 4 below the largest batch, then the largest."""
    out = []
    n = 1
    while n < max_batch_size:
        out.append(n)
        n *= 4
    out.append(max_batch_size)
    return out


def check_compilable(
    model: Any, device: torch.device, dtype: torch.dtype, quantization: str | None
) -> None:
    """Raise ModelLoadError saying why ``--compile`` cannot run here, if it cannot."""
    if device.type != "cpu":
        raise ModelLoadError("--compile is implemented for CPU only; on CUDA leave it off")
    if quantization is not None:
        raise ModelLoadError(
            f"--compile works on unquantized weights; drop --quantize {quantization} or --compile"
        )
    if dtype not in (torch.float32, torch.bfloat16):
        raise ModelLoadError(f"--compile supports float32 and bfloat16, not {dtype}")
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None and shutil.which("clang++") is None:
        raise ModelLoadError(
            f"--compile needs a C++ compiler for Inductor's kernels and found no "
            f"{compiler} (install g++ or set CXX), or start without --compile"
        )
    for name, p in model.named_parameters():
        if type(p.data) is not torch.Tensor:
            raise ModelLoadError(
                f"--compile needs plain tensors; {name} is {type(p.data).__name__}"
            )


class DecodeGraph(torch.nn.Module):
    """One decode step of a Llama-family model over packed rows, written for Inductor.

    Holds the fused q/k/v and gate/up weights; the Hugging Face modules are pointed
    at views of them, so the eager path and the graph share one copy of the weights.
    """

    def __init__(
        self, model: Any, *, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float
    ) -> None:
        super().__init__()
        inner = model.model
        self.embed = inner.embed_tokens
        self.lm_head = model.lm_head
        self.norm_weight = inner.norm.weight
        self.eps = float(inner.norm.variance_epsilon)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scaling = scaling
        self.act = inner.layers[0].mlp.act_fn
        self.qkv = torch.nn.ParameterList()
        self.qkv_bias = torch.nn.ParameterList()
        self.o = torch.nn.ParameterList()
        self.gate_up = torch.nn.ParameterList()
        self.down = torch.nn.ParameterList()
        self.norm1 = torch.nn.ParameterList()
        self.norm2 = torch.nn.ParameterList()
        self.has_bias = inner.layers[0].self_attn.q_proj.bias is not None
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.qkv.append(_fuse([attn.q_proj, attn.k_proj, attn.v_proj]))
            if self.has_bias:
                self.qkv_bias.append(_fuse([attn.q_proj, attn.k_proj, attn.v_proj], "bias"))
            self.gate_up.append(_fuse([mlp.gate_proj, mlp.up_proj]))
            self.o.append(attn.o_proj.weight)
            self.down.append(mlp.down_proj.weight)
            self.norm1.append(layer.input_layernorm.weight)
            self.norm2.append(layer.post_attention_layernorm.weight)

    def forward(
        self,
        ids: torch.Tensor,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        slots: torch.Tensor,
        gather: torch.Tensor,
        mask: torch.Tensor,
        caches: list[torch.Tensor],
    ) -> torch.Tensor:
        T = ids.shape[0]
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        x = self.embed(ids)
        for i in range(len(self.qkv)):
            h = rms_norm(x, self.norm1[i], self.eps)
            qkv = F.linear(h, self.qkv[i], self.qkv_bias[i] if self.has_bias else None)
            qk = qkv[:, : (H + KV) * D].reshape(T, H + KV, D)
            qk = rope(qk, cos, sin_signed)
            q, k = qk.split([H, KV], dim=1)
            v = qkv[:, (H + KV) * D :].reshape(T, KV, D)
            cache = caches[i]
            cache.index_put_((slots,), torch.stack([k, v], dim=1))
            kv = cache[gather]  # [T, L, 2, KV, D]
            o = F.scaled_dot_product_attention(
                q.unsqueeze(2),
                kv[:, :, 0].transpose(1, 2),
                kv[:, :, 1].transpose(1, 2),
                attn_mask=mask,
                scale=self.scaling,
                enable_gqa=True,
            )
            x = F.linear(o.reshape(T, H * D), self.o[i]) + x
            h = rms_norm(x, self.norm2[i], self.eps)
            gate, up = F.linear(h, self.gate_up[i]).chunk(2, dim=-1)
            x = F.linear(self.act(gate) * up, self.down[i]) + x
        return self.lm_head(rms_norm(x, self.norm_weight, self.eps)).float()


def _fuse(modules: list[Any], attr: str = "weight") -> torch.nn.Parameter:
    """Concatenate the modules' weights (or biases) and re-point each module at its view."""
    fused = torch.cat([getattr(m, attr).detach() for m in modules])
    offset = 0
    for m in modules:
        n = getattr(m, attr).shape[0]
        setattr(m, attr, torch.nn.Parameter(fused[offset : offset + n], requires_grad=False))
        offset += n
    return torch.nn.Parameter(fused, requires_grad=False)


class CompiledDecoder:
    """The compiled graph, its buckets and the padding that feeds it."""

    def __init__(self, graph: DecodeGraph, *, max_batch_size: int, scratch_slot: int) -> None:
        self.graph = graph
        self.buckets = buckets_for(max_batch_size)
        self.scratch_slot = scratch_slot
        self.ready: set[int] = set()
        self.steps = 0  # decode steps run through the graph
        self.last_rows = 0
        self.fn = torch.compile(
            graph,
            fullgraph=True,
            dynamic=False,
            # The weights never change after start-up: do not guard on every module.
            options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe},
        )

    def bucket(self, rows: int) -> int | None:
        """The smallest bucket holding ``rows`` rows, or None past the largest."""
        for b in self.buckets:
            if rows <= b:
                return b
        return None

    def __call__(
        self,
        ids: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        gather: torch.Tensor,
        lens: torch.Tensor,
        caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """Run ``len(ids)`` decode rows (padded to a bucket); logits for the real rows."""
        n = ids.shape[0]
        b = self.bucket(n)
        assert b is not None
        width = gather.shape[1]
        if b > n:
            pad = b - n
            ids = torch.cat([ids, ids.new_zeros(pad)])
            cos = torch.cat([cos, cos[:1].expand(pad, -1, -1)])
            sin = torch.cat([sin, sin[:1].expand(pad, -1, -1)])
            slots = torch.cat([slots, slots.new_full((pad,), self.scratch_slot)])
            gather = torch.cat([gather, gather.new_zeros(pad, width)])  # the null block
            lens = torch.cat([lens, lens.new_ones(pad)])
        mask = (torch.arange(width) < lens.unsqueeze(1))[:, None, None, :]
        torch._dynamo.mark_dynamic(gather, 1)
        torch._dynamo.mark_dynamic(mask, 3)
        started = time.perf_counter() if b not in self.ready else None
        # Inductor reads these when it compiles (torch.compile's ``options`` did not
        # turn freezing on in torch 2.13): weights become prepacked constants and the
        # projections Inductor's C++ micro-GEMMs.
        with _inductor_config.patch(_INDUCTOR_OPTIONS):
            logits = self.fn(ids, cos, sin, slots, gather, mask, caches)
        if started is not None:
            self.ready.add(b)
            logger.info(
                "compiled the decode step for %d rows in %.1f s", b, time.perf_counter() - started
            )
        self.steps += 1
        self.last_rows = n
        return logits[:n]


class CompiledHead:
    """The output head of one-row steps as a compiled graph (``--compile`` on families
    without a compiled decode step: Qwen3, Gemma 3).

    At batch 1 a large vocabulary's head is most of a step: Gemma-3-270M's is 262,144 x
    640 (335 MB in bf16), 16-17 ms through oneDNN's prepacked mat-vec here against
    10.9 ms as Inductor's frozen C++ micro-GEMM (~31 GB/s). Compiled for one row only
    (~10 s at start-up); batches keep the prepacked head.
    """

    def __init__(self, head: torch.nn.Module) -> None:
        self.head = head
        self.steps = 0
        self.fn = torch.compile(
            head,
            fullgraph=True,
            dynamic=False,
            options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe},
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of one row ``x [1, hidden]``."""
        with _inductor_config.patch(_INDUCTOR_OPTIONS):
            out = self.fn(x)
        self.steps += 1
        return out
