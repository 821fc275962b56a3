"""The decode step compiled ahead of time and kept on disk (``--compile``, CPU).

A batch-1 bf16 decode step in eager PyTorch on CPU is ~120 matrix-vector products
(oneDNN reaches ~19 GB/s on SmolLM2's narrow 576-wide layers, against ~30 GB/s for
wide ones) plus ~1,500 small ops at 2-5 us each. Compiled with Inductor's freezing
and max-autotune, the projections run in Inductor's C++ micro-GEMMs on prepacked
weights and the norms, rotary and activations fuse into a few loops (see
bench/serving.py and bench/models.py).

What the graph covers: whole steps, one graph row per token: a decode row's new
token, or a token of a prompt chunk (as vLLM's flattened batches), each with its own
adapter or none; only the rows whose logits are wanted go through the head. The paged
KV cache stays the runner's: the graph writes each row's new key/value into its slot
(an in-place ``index_put_`` on the cache, which stays in place), then each row attends
over its own context by flat cache index (``kernels.paged_attention``: read in place,
each row costing its own length, so a prompt's tokens are causal by their positions),
so the cache layout, the block allocator and prefix sharing are unchanged. Adapters
are inputs, not constants: the graph takes the LoRA bank's stacks (every slot, slot 0
zeros) and each row's slot, and adds each row's delta with ``kernels.lora_bgmv_``
(Punica's BGMV: rows without an adapter cost nothing), so loading or evicting an
adapter never recompiles. Without the C++ kernels (``OPENLLM_CLONE_PACKED_LINEAR=0``,
or no AVX2) the graph gathers each row's context and adapter into copies (SDPA,
batched mat-vecs) and runs decode rows only; prompt chunks then run the runner's eager
code. Prompt logprobs (every token's logits) run eagerly.

How: ``torch.export`` of :class:`DecodeGraph` with the rows, the context length and
the cache size as dynamic dimensions, compiled by AOTInductor into one package per stage
(``decode/stage-K/``, unpacked: the kernels and the prepacked weights; one stage unless
``--step-stages`` splits the layers: the first stage embeds the tokens, the last one
applies the head, those between pass the hidden states on) under the compile cache,
keyed by the model's files, dtype, limits, this module's code, torch's version, the
CPU's vector ISA and the thread count. The first start compiles it (SmolLM2 on 2
cores: ~75-95 s, once for every batch size); later starts load it in about a second.
``torch.compile`` could not be persisted: Inductor's cache bypasses graphs holding
oneDNN-packed weights ("mkldnn tensors unpickleable"), and it compiled one graph per
batch bucket (~40 s each) at every start, each with its own packed copy of the weights.
Cost: the package's prepacked weights are a second copy of the projections (+1x
weight memory), and the package on disk is about that size.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from openllm_clone.errors import ModelLoadError

from . import kernels
from .attention import window_mask
from .kernels import pack_quant, pack_weight

__all__ = [
    "LORA_MODULES",
    "BackgroundCompile",
    "CompiledDecoder",
    "DecodeGraph",
    "check_compilable",
    "drain",
    "package_key",
    "prune_cache",
    "rms_norm",
    "rope",
]

logger = logging.getLogger(__name__)

_INDUCTOR_OPTIONS = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
}


# The adapted projections, in the order of the graph's LoRA inputs.
LORA_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


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
        window: int | None = None,
        packed: torch.dtype | None = None,
        paged: bool = False,
    ) -> None:
        super().__init__()
        inner = model.model
        self.embed = inner.embed_tokens
        # Projections through kernels.linear_packed with weights stored in this dtype
        # (bfloat16 only where that is exact or the model's own dtype), else F.linear.
        self.packed = packed
        # Attention and adapter deltas through kernels.paged_attention / lora_bgmv_ (each
        # row reads its own context and adapter in place), so prompt tokens can be rows
        # too; else a gathered copy of each row's context through SDPA, and gathered
        # adapter stacks (decode rows only: the copies grow with rows x context).
        self.paged = paged
        self.window = window  # the local layers' sliding window
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
        first = inner.layers[0]
        self.n_qkv = sum(
            m.weight.shape[0]
            for m in (first.self_attn.q_proj, first.self_attn.k_proj, first.self_attn.v_proj)
        )
        self.n_o = first.self_attn.o_proj.weight.shape[0]
        self.n_gate_up = first.mlp.gate_proj.weight.shape[0] + first.mlp.up_proj.weight.shape[0]
        self.n_down = first.mlp.down_proj.weight.shape[0]
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.qkv.append(self._weight(_fuse([attn.q_proj, attn.k_proj, attn.v_proj])))
            if self.has_bias:
                self.qkv_bias.append(_fuse([attn.q_proj, attn.k_proj, attn.v_proj], "bias"))
            self.gate_up.append(self._weight(_fuse([mlp.gate_proj, mlp.up_proj])))
            self.o.append(self._weight(attn.o_proj.weight))
            self.down.append(self._weight(mlp.down_proj.weight))
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
        head = model.lm_head
        self.n_head = head.weight.shape[0]
        self.head = self._weight(head.weight)
        self.head_bias = head.bias
        # The layers this graph runs (a stage: see stage()), of the model's total.
        self.span = (0, len(inner.layers), len(inner.layers))

    def stage_spans(self, stages: int) -> list[tuple[int, int]]:
        """Layer spans of ``stages`` stages of about equal cost, by the weights each reads
        (the head counts: SmolLM2's is worth ~8 of its 30 layers, so the last stage gets
        fewer layers)."""
        total = self.span[2]
        width = self.embed.weight.shape[1]  # the hidden size: the projections' input
        attn_out = self.num_heads * self.head_dim  # o_proj's input
        layer = (
            self.n_qkv * width
            + self.n_o * attn_out
            + self.n_gate_up * width
            + self.n_down * self.n_gate_up // 2
        )
        cost = [layer] * total
        cost[-1] += self.n_head * width
        stages = max(1, min(stages, total))
        before = [0, *itertools.accumulate(cost)]  # before[i]: the cost of layers < i
        bounds = [0]
        for k in range(1, stages):  # each stage keeps at least one layer
            target = k * before[-1] / stages
            room = range(bounds[-1] + 1, total - (stages - k) + 1)
            bounds.append(min(room, key=lambda i: abs(before[i] - target)))
        return list(itertools.pairwise([*bounds, total]))

    def stage(self, start: int, stop: int) -> DecodeGraph:
        """Layers ``start:stop`` as a graph of their own, on the same parameters (no
        copy): the first stage takes the token ids, a later one the hidden states the
        stage before it returned; only the last one applies the final norm and the head
        and returns logits."""
        total = self.span[2]
        part = copy.copy(self)
        part._parameters = dict(self._parameters)
        part._buffers = dict(self._buffers)
        part._modules = dict(self._modules)
        per_layer = 4 if self.gemma else 2
        for name, lo, hi in (
            ("qkv", start, stop),
            ("o", start, stop),
            ("gate_up", start, stop),
            ("down", start, stop),
            ("qkv_bias", start, stop),
            ("qk_norm", start, stop),
            ("norms", per_layer * start, per_layer * stop),
        ):
            setattr(part, name, torch.nn.ParameterList(list(getattr(self, name))[lo:hi]))
        part.local = self.local[start:stop]
        part.span = (start, stop, total)
        if start > 0:
            part.embed = None
        if stop < total:
            part.norm_weight = part.head = part.head_bias = None
        return part

    def _weight(self, w: torch.nn.Parameter) -> torch.nn.Parameter:
        """The projection's weight as the graph holds it: packed, or the model's own.
        Float32 weights whose values are exactly GGUF Q4_1 or Q8_0 blocks (a checkpoint
        dequantized from a GGUF) keep those blocks (:func:`~.kernels.pack_quant`)."""
        if self.packed is None:
            return w
        if self.packed == torch.float32:
            quant = pack_quant(w)
            if quant is not None:
                return torch.nn.Parameter(quant, requires_grad=False)
        return torch.nn.Parameter(pack_weight(w, self.packed), requires_grad=False)

    def linear_format(self) -> str:
        """How the projections run: ``aten`` (F.linear) or ``packed-`` and the storage
        formats, e.g. ``packed-bfloat16``, ``packed-float32``, ``packed-q4_1+q8_0``."""
        if self.packed is None:
            return "aten"
        weights = [*self.qkv, *self.o, *self.gate_up, *self.down, self.head]
        formats = {
            kernels.QUANT_FORMATS[int(w.shape[-1])]
            if w.dtype == torch.uint8
            else str(w.dtype).replace("torch.", "")
            for w in weights
        }
        return "packed-" + "+".join(sorted(formats))

    def _lin(
        self, x: torch.Tensor, w: torch.Tensor, n: int, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._lin32(x, w, n, bias).to(x.dtype)

    def _lin32(
        self, x: torch.Tensor, w: torch.Tensor, n: int, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x @ w.T (+ bias)`` in float32 (``F.linear``'s dtype without the kernels)."""
        if self.packed is None:
            return F.linear(x, w, bias).float()
        if w.dtype == torch.uint8:
            y = torch.ops.openllm_clone.linear_quant(x.float(), w, n)
        else:
            y = torch.ops.openllm_clone.linear_packed(x.float(), w, n)
        if bias is not None:
            y = y + bias.float()
        return y

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
        idx: torch.Tensor,
        lens: torch.Tensor,
        caches: list[torch.Tensor],
        lora: tuple[
            torch.Tensor,
            list[torch.Tensor],
            list[torch.Tensor],
            list[torch.Tensor],
            list[torch.Tensor],
        ],
        wanted: torch.Tensor,
    ) -> torch.Tensor:
        """One row per token (a decode row's new token, or a token of a prompt chunk).
        A stage after the first takes the hidden states ``[T, hidden]`` in place of
        ``ids``, a stage before the last returns them (``caches``: the stage's layers').
        ``tables``: cos and signed sin of global then local layers, per row; ``slots``:
        each row's KV cache slot; ``idx [T, W]``: the cache slots of each row's context
        (positions 0..W-1, read below ``lens``: the row's position + 1); ``lora``: each
        row's adapter slot and :class:`~.lora.LoraBank`'s stacks ``A[m] [L, S, r, in]``,
        ``B[m] [L, S, r, out]`` for each module of :data:`LORA_MODULES` (slot 0 is
        zeros: rows without an adapter add nothing), then DoRA's float32 scales ``g[m]
        [L, S, out]`` and offsets ``(1 - g) * bias`` (ones and zeros for slots that are not
        DoRA: ``y = (W x + delta) * g + c``); ``wanted``: the rows whose logits
        are returned, in that order."""
        T = ids.shape[0]
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        per_layer = 4 if self.gemma else 2
        row_slots, lora_a, lora_b, dora_g, dora_c = lora
        masks: tuple[torch.Tensor, torch.Tensor] | None = None
        if not self.paged:  # SDPA over a gathered copy: masks from the positions
            k_pos = torch.arange(idx.shape[1], device=idx.device).unsqueeze(0)
            q_pos = (lens - 1).unsqueeze(1)
            mask = window_mask(q_pos, k_pos, None)
            local = window_mask(q_pos, k_pos, self.window) if self.window else mask
            masks = (mask[:, None, None, :], local[:, None, None, :])

        def delta(y: torch.Tensor, x_in: torch.Tensor, m: int, i: int) -> torch.Tensor:
            """``y`` plus each row's own adapter delta, in float32 as the eager step: the
            segmented gather-matmul of Punica / S-LoRA with segments of one row."""
            a = lora_a[m][i][row_slots].float()  # [T, r, in]
            b = lora_b[m][i][row_slots].float()  # [T, r, out]
            xa = torch.bmm(a, x_in.float().unsqueeze(-1))  # [T, r, 1]
            out = y.float() + torch.bmm(xa.transpose(1, 2), b).squeeze(1)
            return (out * dora_g[m][i][row_slots] + dora_c[m][i][row_slots]).to(y.dtype)

        def adapted(
            x_in: torch.Tensor,
            w: torch.Tensor,
            n: int,
            i: int,
            modules: list[tuple[int, int]],
            bias: torch.Tensor | None = None,
        ) -> torch.Tensor:
            """A (fused) projection plus each row's adapter delta of each of its
            ``modules`` (index in LORA_MODULES, output size), on the module's columns."""
            if not self.paged:
                parts = self._lin(x_in, w, n, bias).split([size for _, size in modules], -1)
                return torch.cat([delta(y, x_in, m, i) for y, (m, _) in zip(parts, modules)], -1)
            # In place on the float32 output, each module on its columns: no copies.
            y = self._lin32(x_in, w, n, bias)
            x32, offset = x_in.float(), 0
            for m, size in modules:
                torch.ops.openllm_clone.lora_bgmv_(
                    y,
                    x32,
                    lora_a[m][i],
                    lora_b[m][i],
                    dora_g[m][i],
                    dora_c[m][i],
                    row_slots,
                    offset,
                )
                offset += size
            return y.to(x_in.dtype)

        start, stop, total = self.span
        x = self.embed(ids) if start == 0 else ids
        for j in range(stop - start):
            i = start + j  # the model's layer index: the adapter stacks hold every layer
            local = self.local[j]
            cos, sin_signed = (tables[2], tables[3]) if local else (tables[0], tables[1])
            n = self.norms[per_layer * j : per_layer * (j + 1)]
            h = self._norm(x, n[0])
            bias = self.qkv_bias[j] if self.has_bias else None
            qkv_modules = [(0, H * D), (1, KV * D), (2, KV * D)]
            qkv = adapted(h, self.qkv[j], self.n_qkv, i, qkv_modules, bias)
            qk = self._qk(qkv[:, : (H + KV) * D].reshape(T, H + KV, D), j)
            qk = rope(qk, cos, sin_signed)
            q, k = qk.split([H, KV], dim=1)
            v = qkv[:, (H + KV) * D :].reshape(T, KV, D)
            cache = caches[j]
            cache.index_put_((slots,), torch.stack([k, v], dim=1))
            if masks is None:
                window = self.window if local and self.window else 0
                o = torch.ops.openllm_clone.paged_attention(
                    q.float(), cache, idx, lens, window, self.scaling
                )
            else:
                kv = cache[idx]  # [T, W, 2, KV, D]
                o = F.scaled_dot_product_attention(
                    q.unsqueeze(2),
                    kv[:, :, 0].transpose(1, 2),
                    kv[:, :, 1].transpose(1, 2),
                    attn_mask=masks[1] if local else masks[0],
                    scale=self.scaling,
                    enable_gqa=True,
                )
            o = o.reshape(T, H * D).to(x.dtype)
            a = adapted(o, self.o[j], self.n_o, i, [(3, self.n_o)])
            if self.gemma:
                x = self._norm(a, n[1]) + x
                h = self._norm(x, n[2])
            else:
                x = a + x
                h = self._norm(x, n[1])
            half = self.n_gate_up // 2
            gate_up = adapted(h, self.gate_up[j], self.n_gate_up, i, [(4, half), (5, half)])
            gate, up = gate_up.chunk(2, dim=-1)
            act = self.act(gate) * up
            down = adapted(act, self.down[j], self.n_down, i, [(6, self.n_down)])
            x = (self._norm(down, n[3]) if self.gemma else down) + x
        if stop < total:
            return x
        last = self._norm(x[wanted], self.norm_weight)
        return self._lin(last, self.head, self.n_head, self.head_bias).float()


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
    """The decode graph compiled ahead of time into an AOTInductor package, persisted.

    One package serves every batch size from 1 to ``max_batch_size`` and every context
    length (both dynamic dimensions), so there is one compile per model, one prepacked
    copy of the weights in memory and no padding of rows. The package is written under
    ``cache_dir`` (keyed by what went into it: see :func:`package_key`) and loaded from
    there at the next start in about a second; a broken or unloadable package is
    compiled again. Without a ``graph`` it only loads (``--compile auto``: the package
    is compiled by :class:`BackgroundCompile` in another process).
    """

    def __init__(
        self,
        graph: DecodeGraph | None,
        *,
        max_batch_size: int,
        max_model_len: int,
        cache_dir: Path,
        prune: bool = False,
        stages: int = 1,
    ) -> None:
        self.graph = graph
        self.prune = prune  # after a compile, remove packages unused for 14 days beside it
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.cache_dir = cache_dir
        # The step's stages (consecutive layers each): between two of them the engine
        # may run a step of its own (see run_stages); one unpacked AOTInductor package
        # each, under decode/ (stage-0, stage-1, ...).
        self.stages = stages
        self.package = cache_dir / "decode"
        self.kernels = cache_dir / "kernels"  # the packed linear kernel it calls, if any
        self.fns: list[Any] = []
        self.spans: list[tuple[int, int]] = []
        self.source: str | None = None  # "disk" (a persisted package) or "compiled"
        self.seconds = 0.0  # time to compile or load
        self.steps = 0  # decode steps run through the package
        # How the package's projections run: DecodeGraph.linear_format() ("aten",
        # "packed-bfloat16", "packed-float32", "packed-q4_1+q8_0", ...).
        self.linear: str | None = None
        # Whether the package runs prompt chunks too (its attention and adapters read the
        # cache and the bank in place: DecodeGraph.paged), else decode rows only; read
        # from the package when it is loaded.
        self.paged = False
        self.last_rows = 0

    @property
    def ready(self) -> bool:
        return bool(self.fns)

    def stats(self) -> dict[str, Any]:
        return {
            "max_rows": self.max_batch_size,
            "steps": self.steps,
            "source": self.source,
            "seconds": round(self.seconds, 2),
            "package": str(self.package),
            "linear": self.linear,
            "prompts": self.paged,
            "stages": len(self.fns) or self.stages,
        }

    def prepare(self, example: tuple[Any, ...]) -> None:
        """Load the persisted package, or compile and persist it (``example``: the
        graph's inputs for ``max_batch_size`` rows, the shape hint Inductor tunes for)."""
        if self.fns:
            return
        started = time.perf_counter()
        if self.graph is None:  # load only: the package appears by an atomic rename
            if not self.package.exists():
                raise ModelLoadError(f"no compiled decode step in {self.package}")
            self._load(example)
            self.source = "disk"
        else:
            self._load_or_compile(example)
        self.seconds = time.perf_counter() - started
        with contextlib.suppress(OSError):  # when it was last used, for prune_cache
            (self.cache_dir / _LAST_USED).touch()
        logger.info(
            "decode step %s in %.1f s (%s)",
            "loaded" if self.source == "disk" else "compiled",
            self.seconds,
            self.package,
        )

    def _load_or_compile(self, example: tuple[Any, ...]) -> None:
        assert self.graph is not None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # One compile per package: a second worker starting beside the first waits here,
        # then loads what the first one wrote.
        with open(self.cache_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                _remove_partials(self.cache_dir)
                if self.package.exists():
                    try:
                        self._load(example)
                        self.source = "disk"
                    except Exception as exc:
                        logger.warning(
                            "compiled decode step in %s could not be loaded (%s: %s); "
                            "compiling it again",
                            self.package,
                            type(exc).__name__,
                            str(exc)[:300],
                        )
                if self.source is None:
                    logger.info(
                        "compiling the decode step into %s (once per model, dtype and "
                        "machine; ~1-2 min on 2 cores for a 135M model)",
                        self.package,
                    )
                    self._compile(example)
                    self._load(example)
                    self.source = "compiled"
                    if self.prune:
                        prune_cache(self.cache_dir.parent, keep=self.cache_dir)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self, example: tuple[Any, ...]) -> None:
        """Load the package and run it once on ``example``: a broken package fails here,
        not on a request."""
        if self.kernels.exists():  # the package calls the packed linear kernel
            kernels.load(self.kernels)
        try:
            about = json.loads((self.package / _ABOUT).read_text())
            spans = [(int(a), int(b)) for a, b in about["stages"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{self.package} has no readable {_ABOUT}: {exc}") from exc
        fns = [_load_unpacked(self.package / f"stage-{k}") for k in range(len(spans))]
        drain(_run_stages(fns, spans, example))
        self.fns, self.spans = fns, spans
        self.linear = about.get("linear")
        self.paged = bool(about.get("paged"))

    def _compile(self, example: tuple[Any, ...]) -> None:
        from torch.export import Dim

        assert self.graph is not None
        ids, tables, _, _, _, caches, lora, _ = example
        rows = Dim("rows", min=1)  # tokens: decode rows and prompt chunks
        width = Dim("context", min=2, max=max(self.max_model_len + 16, 32))
        logit_rows = Dim("logit_rows", min=1)
        cache_slots = Dim("cache_slots", min=2)
        lora_slots = Dim("lora_slots", min=2)  # the bank's slots (slot 0: none)
        lora_rank = Dim("lora_rank", min=2)

        by_row = {0: rows}
        dynamic = (
            by_row,  # ids
            tuple(by_row for _ in tables),
            by_row,  # slots
            {0: rows, 1: width},  # idx
            by_row,  # lens
            [{0: cache_slots} for _ in caches],
            (
                by_row,
                [{1: lora_slots, 2: lora_rank} for _ in lora[1]],
                [{1: lora_slots, 2: lora_rank} for _ in lora[2]],
                [{1: lora_slots} for _ in lora[3]],
                [{1: lora_slots} for _ in lora[4]],
            ),
            {0: logit_rows},
        )
        if self.graph.packed is not None or self.graph.paged:
            kernels.build(self.kernels)
        spans = self.graph.stage_spans(self.stages)
        partial = self.cache_dir / f"decode.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            assembled = partial / "decode"
            assembled.mkdir(parents=True)
            hidden = self.graph.embed(ids)
            for k, (a, b) in enumerate(spans):
                graph = self.graph.stage(a, b) if len(spans) > 1 else self.graph
                args = (ids if a == 0 else torch.zeros_like(hidden), *example[1:5])
                args = (*args, caches[a:b], lora, example[7])
                shapes = (by_row, *dynamic[1:5], dynamic[5][a:b], *dynamic[6:])
                program = torch.export.export(graph, args, dynamic_shapes=shapes, strict=False)
                archive = partial / f"stage-{k}.pt2"
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(archive), inductor_configs=dict(_INDUCTOR_OPTIONS)
                )
                # Kept unpacked: a .pt2 is extracted to a temporary folder at every load
                # (~1x the weights), and left behind when the process is killed.
                with zipfile.ZipFile(archive) as zipped:
                    zipped.extractall(partial / f"unpacked-{k}")
                (root,) = (partial / f"unpacked-{k}").iterdir()  # the archive's top folder
                os.replace(root, assembled / f"stage-{k}")
                archive.unlink()
            linear = self.graph.linear_format()
            logger.info("compiled step: projections stored as %s", linear)
            about = {"linear": linear, "paged": self.graph.paged, "stages": spans}
            (assembled / _ABOUT).write_text(json.dumps(about))
            shutil.rmtree(self.package, ignore_errors=True)  # a broken one, if any
            os.replace(assembled, self.package)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def run_stages(self, inputs: tuple[Any, ...]) -> Generator[None, None, torch.Tensor]:
        """Run the graph on its inputs (see :meth:`DecodeGraph.forward`) a stage at a
        time: yields between two stages (the caller may run other steps there, on other
        rows and KV slots), returns the fp32 logits of the ``wanted`` rows (:func:`drain`
        runs it without pausing)."""
        assert self.fns, "prepare() first"
        logits = yield from _run_stages(self.fns, self.spans, inputs)
        self.steps += 1
        self.last_rows = int(inputs[0].shape[0])
        return logits


def _run_stages(
    fns: list[Any], spans: list[tuple[int, int]], inputs: tuple[Any, ...]
) -> Generator[None, None, torch.Tensor]:
    """The stages in order, each on the hidden states of the one before; yields between."""
    x, tables, slots, idx, lens, caches, lora, wanted = inputs
    for k, (fn, (a, b)) in enumerate(zip(fns, spans, strict=True)):
        if k:
            yield
        x = fn(x, tables, slots, idx, lens, caches[a:b], lora, wanted)
    return x


def drain(stages: Generator[None, None, torch.Tensor]) -> torch.Tensor:
    """Run a staged step to its end, without pausing."""
    while True:
        try:
            next(stages)
        except StopIteration as done:
            return done.value


class BackgroundCompile:
    """``--compile auto`` on a model with no package in the cache yet: the package is
    compiled by a child process (``python -m openllm_clone.runners.compile_worker``) at
    a lower CPU priority while the server answers requests with the eager step; the
    runner polls it between steps and loads the package when it is there.

    The child loads the model from its folder itself (the server's weights are already
    packed for the eager step), holds the compile cache's lock like an in-process
    compile, and exits when its parent does. Its output goes to ``compile.log`` in the
    package's folder.
    """

    def __init__(
        self,
        *,
        model_path: Path,
        dtype: torch.dtype,
        max_batch_size: int,
        max_model_len: int,
        cache_dir: Path,
        stages: int = 1,
    ) -> None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.log = cache_dir / "compile.log"
        self.started = time.monotonic()
        cmd = [
            sys.executable,
            "-m",
            "openllm_clone.runners.compile_worker",
            "--model",
            str(model_path),
            "--dtype",
            str(dtype).replace("torch.", ""),
            "--max-batch-size",
            str(max_batch_size),
            "--max-model-len",
            str(max_model_len),
            "--cache-dir",
            str(cache_dir),
            "--stages",
            str(stages),
            "--threads",
            str(torch.get_num_threads()),  # the package is keyed by the server's count
        ]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        logger.info(
            "decode steps run eagerly while the compiled step is built in the background "
            "(pid %d, ~1-2 min for a 135M model on 2 cores; log: %s); later starts load it "
            "in seconds",
            self.proc.pid,
            self.log,
        )

    def poll(self) -> int | None:
        """The child's exit status, or None while it runs."""
        return self.proc.poll()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def tail(self, chars: int = 600) -> str:
        """The end of the child's log (why it failed)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return " ".join(text[-chars:].split())

    def stop(self) -> None:
        """Stop the child (the server is shutting down)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_ABOUT = "openllm_clone.json"  # what the package was built with, beside its files
_LAST_USED = ".last-used"  # touched at each load or compile


def _remove_partials(folder: Path) -> None:
    """Remove what compiles killed midway left (``decode.partial-<pid>``, ~1x the
    weights each), unless their process is still running."""
    for partial in folder.glob("decode.partial-*"):
        try:
            os.kill(int(partial.name.rsplit("-", 1)[1]), 0)
            continue  # still compiling (another process under another lock? keep it)
        except (ValueError, ProcessLookupError):  # not a pid, or its process is gone
            pass
        except PermissionError:
            continue  # alive, another user's
        logger.info("removing %s, left by a compile that did not finish", partial)
        shutil.rmtree(partial, ignore_errors=True)


def prune_cache(root: Path, *, keep: Path | None = None, days: float = 14.0) -> list[Path]:
    """Remove compiled steps under ``root`` not loaded for ``days`` (packages of older
    code, torch versions or settings pile up: each is about the size of the weights);
    a folder whose lock is held is in use and kept. Returns what was removed."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    now = time.time()
    for folder in root.iterdir():
        marker = folder / _LAST_USED
        if folder == keep or not marker.is_file():  # only folders CompiledDecoder made
            continue
        if now - marker.stat().st_mtime < days * 86400:
            continue
        with open(folder / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue
            shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        logger.info("removed %s from the compile cache (unused for %.0f days)", folder, days)
    return removed


def _load_unpacked(folder: Path) -> Any:
    """An AOTInductor package unpacked in ``folder``, loaded in place (torch's loader
    takes a folder as well as a .pt2; ``aoti_load_package`` only passes files)."""
    from torch._inductor.package.package import AOTICompiledModel

    loader = torch._C._aoti.AOTIModelPackageLoader(str(folder), "model", False, 1, -1)
    return AOTICompiledModel(loader)


def package_key(parts: dict[str, Any]) -> str:
    """A short hash of everything a compiled package depends on: ``parts`` (the model's
    files, dtype, sizes, ...) plus this module's code, torch's version, the CPU's vector
    ISA and the thread count Inductor's kernels are built for."""
    from torch._inductor import cpu_vec_isa

    everything = {
        **parts,
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "kernels": kernels.source_digest(),
        "packed_linear": kernels.enabled(),
        "torch": torch.__version__,
        "isa": str(cpu_vec_isa.pick_vec_isa()),
        "threads": torch.get_num_threads(),
    }
    blob = json.dumps(everything, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
