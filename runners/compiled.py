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
import types
from typing import Any

import torch
import torch._inductor.config as _inductor_config
import torch.nn.functional as F

from openllm_clone.errors import ModelLoadError

__all__ = ["CompiledDecoder", "DecodeGraph", "buckets_for", "rms_norm", "rope"]

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
    """One decode step over packed rows, written for Inductor: the Llama family (Llama,
    Mistral, Qwen2), Qwen3 (per-head q/k norms) and Gemma 3 (norms of the form
    ``(1 + w)`` in float32, four of them a layer, q/k norms, and local layers with their
    own rotary tables and a sliding window).

    Holds the fused q/k/v and gate/up weights; the Hugging Face modules are pointed
    at views of them, so the eager path and the graph share one copy of the weights.
    Per-layer choices (local or global) are Python constants, unrolled when traced.
    """

    def __init__(
        self,
        model: Any,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scaling: float,
        qk_norm: list[torch.Tensor] | None = None,
        qk_eps: float = 0.0,
        gemma: bool = False,
        local_layers: list[bool] | None = None,
    ) -> None:
        super().__init__()
        inner = model.model
        self.embed = inner.embed_tokens
        self.lm_head = model.lm_head
        self.gemma = gemma
        self.eps = float(_norm_eps(inner.norm))
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scaling = scaling
        self.act = inner.layers[0].mlp.act_fn
        self.local = list(local_layers or [False] * len(inner.layers))
        self.qk_eps = qk_eps
        self.qk_norm = torch.nn.ParameterList(
            [torch.nn.Parameter(w, requires_grad=False) for w in qk_norm or []]
        )
        self.qkv = torch.nn.ParameterList()
        self.qkv_bias = torch.nn.ParameterList()
        self.o = torch.nn.ParameterList()
        self.gate_up = torch.nn.ParameterList()
        self.down = torch.nn.ParameterList()
        # Per layer: the input norm and the one before the MLP; Gemma also normalises the
        # attention and MLP outputs.
        self.norms = torch.nn.ParameterList()
        self.norm_weight = self._norm_param(inner.norm)
        self.has_bias = inner.layers[0].self_attn.q_proj.bias is not None
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.qkv.append(_fuse([attn.q_proj, attn.k_proj, attn.v_proj]))
            if self.has_bias:
                self.qkv_bias.append(_fuse([attn.q_proj, attn.k_proj, attn.v_proj], "bias"))
            self.gate_up.append(_fuse([mlp.gate_proj, mlp.up_proj]))
            self.o.append(attn.o_proj.weight)
            self.down.append(mlp.down_proj.weight)
            names = (
                (
                    "input_layernorm",
                    "post_attention_layernorm",
                    "pre_feedforward_layernorm",
                    "post_feedforward_layernorm",
                )
                if gemma
                else ("input_layernorm", "post_attention_layernorm")
            )
            for name in names:
                self.norms.append(self._norm_param(getattr(layer, name)))

    def _norm_param(self, module: Any) -> torch.nn.Parameter:
        """The weight a norm scales by: Gemma's ``1 + w`` in float32, else ``w``."""
        w = module.weight.detach()
        return torch.nn.Parameter(1.0 + w.float() if self.gemma else w, requires_grad=False)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.gemma:  # as Gemma's module: normalise and scale in float32, then round
            return (F.rms_norm(x.float(), (x.shape[-1],), None, self.eps) * weight).to(x.dtype)
        return rms_norm(x, weight, self.eps)

    def _qk(self, qk: torch.Tensor, i: int) -> torch.Tensor:
        """Qwen3 / Gemma 3: every query and key head normalised (as the eager step)."""
        if not len(self.qk_norm):
            return qk
        normed = F.rms_norm(qk.float(), (self.head_dim,), None, self.qk_eps)
        if self.gemma:
            return (normed * self.qk_norm[i]).to(qk.dtype)
        return normed.to(qk.dtype) * self.qk_norm[i]

    def forward(
        self,
        ids: torch.Tensor,
        tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        slots: torch.Tensor,
        gather: torch.Tensor,
        masks: tuple[torch.Tensor, torch.Tensor],
        caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """``tables``: cos and signed sin of global then local layers; ``masks``: the
        attention mask of global then local (windowed) layers."""
        T = ids.shape[0]
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        per_layer = 4 if self.gemma else 2
        x = self.embed(ids)
        for i in range(len(self.qkv)):
            local = self.local[i]
            cos, sin_signed = (tables[2], tables[3]) if local else (tables[0], tables[1])
            mask = masks[1] if local else masks[0]
            n = self.norms[per_layer * i : per_layer * (i + 1)]
            h = self._norm(x, n[0])
            qkv = F.linear(h, self.qkv[i], self.qkv_bias[i] if self.has_bias else None)
            qk = self._qk(qkv[:, : (H + KV) * D].reshape(T, H + KV, D), i)
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
            a = F.linear(o.reshape(T, H * D), self.o[i])
            if self.gemma:
                x = self._norm(a, n[1]) + x
                h = self._norm(x, n[2])
                gate, up = F.linear(h, self.gate_up[i]).chunk(2, dim=-1)
                x = self._norm(F.linear(self.act(gate) * up, self.down[i]), n[3]) + x
            else:
                x = a + x
                h = self._norm(x, n[1])
                gate, up = F.linear(h, self.gate_up[i]).chunk(2, dim=-1)
                x = F.linear(self.act(gate) * up, self.down[i]) + x
        return self.lm_head(self._norm(x, self.norm_weight)).float()


def _own_code(graph: torch.nn.Module) -> None:
    """Give ``graph.forward`` a code object of its own.

    Dynamo keeps compiled graphs on the code object it traced (``forward``'s, shared by
    every DecodeGraph in the process) and, with the module guards skipped, a second
    graph passes the first one's guards; with freezing the weights are constants of the
    compiled graph, so a second model in the process would run the first one's weights.
    """
    forward = type(graph).forward
    own = types.FunctionType(
        forward.__code__.replace(),  # a new code object: its own compiled-graph cache
        forward.__globals__,
        forward.__name__,
        forward.__defaults__,
        forward.__closure__,
    )
    graph.forward = types.MethodType(own, graph)  # type: ignore[method-assign]


def _norm_eps(module: Any) -> float:
    eps = getattr(module, "variance_epsilon", None)
    return float(eps if eps is not None else module.eps)


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
        _own_code(graph)
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
        tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        slots: torch.Tensor,
        gather: torch.Tensor,
        lens: torch.Tensor,
        caches: list[torch.Tensor],
        window: int | None = None,
    ) -> torch.Tensor:
        """Run ``len(ids)`` decode rows (padded to a bucket); logits for the real rows.
        ``tables``: cos and signed sin ``[rows, 1, D]`` of global, then local layers;
        ``window``: the local layers' sliding window (None: no local layers)."""
        n = ids.shape[0]
        b = self.bucket(n)
        assert b is not None
        width = gather.shape[1]
        if b > n:
            pad = b - n
            ids = torch.cat([ids, ids.new_zeros(pad)])
            tables = tuple(  # type: ignore[assignment]
                torch.cat([t, t[:1].expand(pad, -1, -1)]) for t in tables
            )
            slots = torch.cat([slots, slots.new_full((pad,), self.scratch_slot)])
            gather = torch.cat([gather, gather.new_zeros(pad, width)])  # the null block
            lens = torch.cat([lens, lens.new_ones(pad)])
        k_pos = torch.arange(width).unsqueeze(0)
        mask = k_pos < lens.unsqueeze(1)
        local = mask & (k_pos > (lens - 1).unsqueeze(1) - window) if window else mask
        masks = (mask[:, None, None, :], local[:, None, None, :])
        torch._dynamo.mark_dynamic(gather, 1)
        for m in masks:
            torch._dynamo.mark_dynamic(m, 3)
        started = time.perf_counter() if b not in self.ready else None
        # Inductor reads these when it compiles (torch.compile's ``options`` did not
        # turn freezing on in torch 2.13): weights become prepacked constants and the
        # projections Inductor's C++ micro-GEMMs.
        with _inductor_config.patch(_INDUCTOR_OPTIONS):
            logits = self.fn(ids, tables, slots, gather, masks, caches)
        if started is not None:
            self.ready.add(b)
            logger.info(
                "compiled the decode step for %d rows in %.1f s", b, time.perf_counter() - started
            )
        self.steps += 1
        self.last_rows = n
        return logits[:n]
