"""The PyTorch runner: a transformers model driven by a packed, paged, per-row-adapter step.

The weights and modules are the Hugging Face model's own (so quantized Linear
layers from bitsandbytes or GPTQ work unchanged); what this file replaces is the
forward loop around them:

- tokens of all rows are packed into one ``[T, hidden]`` tensor (no padding), so
  every projection is one matmul for the whole batch;
- keys and values live in a block pool (PagedAttention's idea): a row owns a list of
  blocks and gets a new one every ``block_size`` tokens;
- single-token (decode) rows attend in one batched SDPA call over their gathered
  blocks; prompt chunks attend one row at a time with a causal mask;
- each row's LoRA adapter is added by :class:`~openllm_clone.runners.lora.LoraBank`;
- logits are computed only for the rows that need them, at their last token.

Supported families: Llama, Mistral, Qwen2 and Qwen3 (their decoder layers share the
same module names; Qwen3 adds per-head RMSNorm on queries and keys) without a sliding
window shorter than the context, and Gemma 3 (norms that scale by 1 + weight, four
norms a layer, local layers with their own rotary base and a sliding window). Everything else runs
on the generic runner (:mod:`.generic`); :func:`fast_refusal` says why a model does not
fit here.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from openllm_clone.errors import ModelLoadError

from . import kernels
from .attention import decode_attention, window_mask
from .base import ModelInfo, StepRow, pack_rows, put_hidden_states
from .compiled import (
    LORA_MODULES,
    BackgroundCompile,
    CompiledDecoder,
    DecodeGraph,
    check_compilable,
    drain,
    rms_norm,
    rope,
)
from .dora import ReleasedWeights, dora_base
from .fast_support import GEMMA_MODEL_TYPES, SUPPORTED_MODEL_TYPES, fast_refusal
from .lora import LoraBank, LoraPlan, saved_targets
from .packed import PackedLinear, packed_linears_work

__all__ = ["SUPPORTED_MODEL_TYPES", "TorchRunner", "fast_refusal"]

logger = logging.getLogger(__name__)

# Families whose queries and keys are RMS-normalised per head before rotary.
QK_NORM_MODEL_TYPES = ("qwen3", "gemma3_text")
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
NULL_BLOCK = 0  # a zeroed block that padded attention reads point at


class TorchRunner:
    """Executes steps on a Llama-family model with a paged KV cache and LoRA slots."""

    tier = "fast"

    def __init__(
        self,
        model: Any,
        *,
        model_id: str,
        kv_cache_bytes: int,
        block_size: int = 16,
        max_model_len: int | None = None,
        max_adapters: int = 8,
        quantization: str | None = None,
        compile: str = "off",
        max_batch_size: int = 16,
        compile_cache: Callable[[], Path | None] | None = None,
        model_path: Path | None = None,
        stages: int = 1,
    ) -> None:
        config = model.config
        refusal = fast_refusal(config, max_model_len)
        if refusal is not None:
            raise ModelLoadError(f"the fast runner cannot serve this model: {refusal}")
        self.model = model.eval()
        self.config = config
        inner = model.model
        self.layers = list(inner.layers)
        self.embed = inner.embed_tokens
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        self.num_layers = len(self.layers)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scaling = getattr(self.layers[0].self_attn, "scaling", self.head_dim**-0.5)
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            self.dtype = torch.float32
        model_max = int(getattr(config, "max_position_embeddings", 2048))
        self.max_model_len = min(max_model_len or model_max, model_max)

        # KV pool: [num_blocks * block_size, kv_heads, head_dim] per layer, K and V.
        self.block_size = block_size
        per_token = 2 * self.num_layers * self.num_kv_heads * self.head_dim
        per_token_bytes = per_token * torch.tensor([], dtype=self.dtype).element_size()
        self.num_blocks = max(2, kv_cache_bytes // (per_token_bytes * block_size))
        self.kv_bytes_per_token = per_token_bytes
        # One block past the allocator's: the scratch slot the compiled step's warm-up writes.
        slots = (self.num_blocks + 1) * block_size
        self.scratch_slot = self.num_blocks * block_size
        # Keys and values of a token sit side by side, so one gather reads both.
        shape = (slots, 2, self.num_kv_heads, self.head_dim)
        # Zeroed, so the whole pool is resident from the start: the server claims its
        # memory once (a host without it fails at start, not hours later on a page fault),
        # and resident memory stays flat as blocks are first used.
        self.kv_cache = [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers
        ]

        dims = {}
        attn = self.layers[0].self_attn
        mlp = self.layers[0].mlp
        for name in ATTN_MODULES:
            dims[f"self_attn.{name}"] = self._linear_dims(getattr(attn, name))
        for name in MLP_MODULES:
            dims[f"mlp.{name}"] = self._linear_dims(getattr(mlp, name))
        self.lora = LoraBank(
            dims, self.num_layers, max_adapters, dtype=self.dtype, device=self.device
        )
        # DoRA reads the base projections' weights (or, once packing released them, what
        # it kept of them); saved modules replace the embeddings or the head per row.
        self._released = ReleasedWeights()
        self.lora.dora_base = dora_base(self.layers, self._released, self.dtype)
        self.lora.saved_modules = saved_targets(model)
        self._embed_path = self.lora.saved_path(self.embed)
        self._head_path = self.lora.saved_path(self.lm_head)

        # Read before packing, which releases the original Linear weights.
        weight_bytes = sum(
            t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
        )
        num_parameters = sum(p.numel() for p in model.parameters())
        self._packed_head: PackedLinear | None = None
        self._compiled: CompiledDecoder | None = None
        self.gemma = config.model_type in GEMMA_MODEL_TYPES
        # Per-layer sliding windows (Gemma 3's local layers), else None.
        self.windows = [
            getattr(layer.self_attn, "sliding_window", None) if self.gemma else None
            for layer in self.layers
        ]
        self.layer_types = list(getattr(config, "layer_types", None) or []) if self.gemma else []
        # Gemma's norms scale by (1 + weight) in float32: precomputed once per norm.
        self._gemma_scale: dict[int, torch.Tensor] = {}
        if self.gemma:
            for module in model.modules():
                if type(module).__name__.endswith("RMSNorm"):
                    self._gemma_scale[id(module)] = 1.0 + module.weight.float()
        # Qwen3 / Gemma 3: one [H + KV, D] weight normalises queries and keys in one call.
        self._qk_norm: list[torch.Tensor] | None = None
        self._qk_eps = 0.0
        if config.model_type in QK_NORM_MODEL_TYPES:
            attn0 = self.layers[0].self_attn
            self._qk_eps = float(
                getattr(attn0.q_norm, "variance_epsilon", None) or attn0.q_norm.eps
            )
            self._qk_norm = []
            for layer in self.layers:
                qn, kn = layer.self_attn.q_norm, layer.self_attn.k_norm
                if self.gemma:
                    qw, kw = self._gemma_scale[id(qn)], self._gemma_scale[id(kn)]
                else:
                    qw, kw = qn.weight, kn.weight
                self._qk_norm.append(
                    torch.cat([qw.expand(self.num_heads, -1), kw.expand(self.num_kv_heads, -1)])
                )
        # --compile: on (compile or load before serving), auto (load the package if the
        # cache has it, else build it in a background process and switch when it is
        # there), off. See .compiled.
        mode = compile
        windows = {w for w in self.windows if w is not None}
        self._window_size: int | None = next(iter(windows), None)  # the local layers' window
        self._background: BackgroundCompile | None = None
        self._compile_failed: str | None = None
        self._model_path = model_path
        if mode != "off":
            try:
                check_compilable(model, self.device, self.dtype, quantization)
                if len(windows) > 1:
                    raise ModelLoadError(
                        f"--compile supports one sliding window per model, not {sorted(windows)}"
                    )
                if mode == "auto" and model_path is None:
                    raise ModelLoadError("no model folder to compile from")
            except ModelLoadError as exc:
                if mode == "on":
                    raise
                logger.info("decode steps run eagerly (no compiled step: %s)", exc.message)
                mode = "off"
        self.compile_mode = mode
        if mode != "off":
            graph = None
            if mode == "on":  # compiled in this process: the graph shares the weights
                graph = DecodeGraph(
                    model,
                    num_heads=self.num_heads,
                    num_kv_heads=self.num_kv_heads,
                    head_dim=self.head_dim,
                    scaling=self.scaling,
                    qk_norm=self._qk_norm,
                    qk_eps=self._qk_eps,
                    gemma=self.gemma,
                    local_layers=[w is not None for w in self.windows],
                    window=self._window_size,
                    packed=self._packed_dtype(model),
                    paged=kernels.enabled() and self.dtype in (torch.float32, torch.bfloat16),
                )
            # Asked only here: keying the cache reads the model's files and probes the
            # CPU, work a start that cannot compile has no use for.
            cache_dir = compile_cache() if compile_cache is not None else None
            kept = cache_dir is not None
            if cache_dir is None:  # nowhere to keep it: compile at every start
                # Removed when the process exits (the package is ~1x the weights).
                self._compile_tmp = tempfile.TemporaryDirectory(prefix="openllm-clone-compiled-")
                cache_dir = Path(self._compile_tmp.name)
            self._compiled = CompiledDecoder(
                graph,
                max_batch_size=max_batch_size,
                max_model_len=self.max_model_len,
                cache_dir=cache_dir,
                prune=kept,
                stages=stages,
            )
        # The eager step (prompt chunks, adapter rows, and every step until the compiled
        # one is there) runs on prepacked layers; with --compile on they are packed once
        # the package is loaded (the export needs the plain weights).
        self._fused = None if mode == "on" else self._pack_layers()
        self.info = ModelInfo(
            model_id=model_id,
            architecture=(getattr(config, "architectures", None) or [type(model).__name__])[0],
            dtype=str(self.dtype).replace("torch.", ""),
            device=str(self.device),
            max_model_len=self.max_model_len,
            vocab_size=int(config.vocab_size),
            hidden_size=int(getattr(config, "hidden_size", 0) or 0),
            num_parameters=num_parameters,
            weight_bytes=weight_bytes,
            quantization=quantization,
            extra={"runner": self.tier},
        )

    def _pack_layers(self) -> list[dict[str, PackedLinear]] | None:
        """Fuse q/k/v and gate/up and prepack them (see :mod:`.packed`), for plain bf16 or
        float32 Linears on CPU.

        The original Linear weights are released afterwards (the packed copy replaces
        them), so memory does not double. Quantized or non-CPU layers keep their own
        modules.
        """
        if self.device.type != "cpu" or not packed_linears_work(self.dtype):
            return None
        names = ATTN_MODULES + MLP_MODULES
        for layer in self.layers:
            mods = [getattr(layer.self_attn, n) for n in ATTN_MODULES] + [
                getattr(layer.mlp, n) for n in MLP_MODULES
            ]
            # Only plain tensors: quantized weights (bitsandbytes, torchao subclasses, GPTQ)
            # keep running through their own modules.
            if any(
                type(m) is not torch.nn.Linear
                or type(m.weight.data) is not torch.Tensor
                or m.weight.dtype != self.dtype
                for m in mods
            ):
                return None
        head = self.lm_head.weight
        if type(head.data) is not torch.Tensor or head.dtype != self.dtype:
            return None
        packed = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
            bias = (
                torch.cat([m.bias for m in qkv]) if all(m.bias is not None for m in qkv) else None
            )
            entry = {
                "qkv": PackedLinear(torch.cat([m.weight for m in qkv]), bias),
                "o_proj": PackedLinear(attn.o_proj.weight, attn.o_proj.bias),
                "gate_up": PackedLinear(
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                    None
                    if mlp.gate_proj.bias is None
                    else torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]),
                ),
                "down_proj": PackedLinear(mlp.down_proj.weight, mlp.down_proj.bias),
            }
            packed.append(entry)
            q_out, kv_out = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
            inter = mlp.gate_proj.weight.shape[0]
            shares = {
                "q_proj": ("qkv", (0, q_out)),
                "k_proj": ("qkv", (q_out, q_out + kv_out)),
                "v_proj": ("qkv", (q_out + kv_out, q_out + 2 * kv_out)),
                "o_proj": ("o_proj", None),
                "gate_proj": ("gate_up", (0, inter)),
                "up_proj": ("gate_up", (inter, 2 * inter)),
                "down_proj": ("down_proj", None),
            }
            for name in names:
                module = getattr(attn if name in ATTN_MODULES else mlp, name)
                fused, columns = shares[name]
                self._released.keep(module, module.weight, entry[fused], columns)
                module.weight = torch.nn.Parameter(
                    torch.empty(0, dtype=self.dtype), requires_grad=False
                )
        head = self.lm_head.weight
        self._packed_head = PackedLinear(head, getattr(self.lm_head, "bias", None))
        return packed

    @property
    def packed(self) -> bool:
        """True when the layers run through prepacked oneDNN weights."""
        return self._fused is not None

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one KV block in every layer (copy-on-write for forked samples)."""
        bs = self.block_size
        for cache in self.kv_cache:
            cache[dst * bs : (dst + 1) * bs].copy_(cache[src * bs : (src + 1) * bs])

    def _packed_dtype(self, model: Any) -> torch.dtype | None:
        """How the compiled step stores its projections for :mod:`.kernels`: bfloat16
        where that is exact (a bf16 model, or float32 weights that are all bf16 values),
        else float32; None (F.linear) where the kernel cannot run or
        ``OPENLLM_CLONE_PACKED_LINEAR=0``."""
        if not kernels.enabled():
            return None
        if self.dtype == torch.bfloat16:
            return torch.bfloat16
        weights = [p for name, p in model.named_parameters() if name.endswith("proj.weight")]
        weights.append(model.lm_head.weight)
        chosen = torch.bfloat16 if kernels.bf16_exact(weights) else torch.float32
        logger.info(
            "compiled step: projections in %s (%s)",
            chosen,
            "float32 math on bfloat16 values, exact"
            if chosen == torch.bfloat16
            else "the weights are not all bfloat16 values; those that are exactly GGUF "
            "Q4_1 or Q8_0 blocks keep them",
        )
        return chosen

    @staticmethod
    def _linear_dims(module: Any) -> tuple[int, int]:
        in_features = getattr(module, "in_features", None)
        out_features = getattr(module, "out_features", None)
        if in_features is None or out_features is None:
            weight = module.weight
            out_features, in_features = weight.shape
        return int(in_features), int(out_features)

    # --- the step ---------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, rows: list[StepRow]) -> torch.Tensor:
        """One forward over packed rows; fp32 logits as :func:`~.base.logit_rows` says."""
        if not rows:
            return torch.empty(0, self.info.vocab_size)
        if self.device.type != "cuda":
            return self._step(rows)
        # cuDNN attention builds a new plan for every new context length (1.6 ms of CPU
        # per call on an H100, measured): the other backends do not.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(
            [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        ):
            return self._step(rows)

    @property
    def compiled(self) -> bool:
        """True when decode steps run compiled (or will, once the package is built)."""
        return self._compiled is not None

    def compiled_stats(self) -> dict[str, Any] | None:
        """The compiled step: ``mode`` (on/auto), ``state`` (ready, compiling, or failed
        with its ``error``), where it came from (``disk`` or ``compiled``), the most rows
        it takes and how many decode steps ran through it; None when off."""
        if self._compiled is None:
            if self._compile_failed is None:
                return None
            return {"mode": self.compile_mode, "state": "failed", "error": self._compile_failed}
        state = "ready" if self._compiled.ready else "compiling"
        if self._background is None and not self._compiled.ready:
            state = "pending"
        return {"mode": self.compile_mode, "state": state, **self._compiled.stats()}

    def warmup(self) -> None:
        """Before the first request: ``--compile on`` loads or compiles the decode step
        (then packs the eager layers); ``auto`` loads it from the cache, or starts the
        background compile. A no-op with ``--compile off``."""
        if self._compiled is None or self._compiled.ready:
            return
        if self.compile_mode == "on":
            self.compile_step()
            self._compiled.graph = None  # its fused weights: the package has its own
            self._fused = self._pack_layers()
            return
        if self._compiled.package.exists():
            try:
                self.compile_step()
                return
            except Exception as exc:
                logger.warning(
                    "compiled decode step in %s could not be loaded (%s: %s); building it "
                    "again in the background",
                    self._compiled.package,
                    type(exc).__name__,
                    str(exc)[:300],
                )
        if self._background is None:
            assert self._model_path is not None
            self._background = BackgroundCompile(
                model_path=self._model_path,
                dtype=self.dtype,
                max_batch_size=self._compiled.max_batch_size,
                max_model_len=self.max_model_len,
                cache_dir=self._compiled.cache_dir,
                stages=self._compiled.stages,
            )

    def warmup_compiles(self) -> bool:
        """True when :meth:`warmup` compiles the step in this process (``--compile on``
        with no package in the cache): minutes, not the seconds of a load."""
        compiled = self._compiled
        return (
            compiled is not None
            and not compiled.ready
            and self.compile_mode == "on"
            and not compiled.package.exists()
        )

    def compile_step(self) -> None:
        """Load the compiled decode step from the cache, or (``--compile on``) compile it."""
        assert self._compiled is not None
        # The example Inductor tunes for: a full batch and a little more (prompt tokens).
        rows = [StepRow([0], 1, [NULL_BLOCK]) for _ in range(2 * self._compiled.max_batch_size + 6)]
        with torch.inference_mode():
            self._compiled.prepare(self._compiled_inputs(rows, scratch=True))

    def _poll_background(self) -> None:
        """Between steps: switch to the compiled step once the background compile is done."""
        assert self._background is not None and self._compiled is not None
        status = self._background.poll()
        if status is None:
            return
        background, self._background = self._background, None
        error = f"the compile process exited with status {status}: {background.tail()}"
        if status == 0:
            try:
                self.compile_step()
                logger.info(
                    "decode steps now run compiled (built in the background in %.0f s)",
                    background.seconds,
                )
                return
            except Exception as exc:
                error = f"{type(exc).__name__}: {str(exc)[:300]}"
        logger.warning("decode steps stay eager: %s (log: %s)", error, background.log)
        self._compiled, self._compile_failed = None, error

    def idle(self) -> bool:
        """No request runs: pick up a finished background compile now, so that
        ``/v1/metadata`` says ready and the next request runs compiled, rather than at the
        next request's first step. True while a background compile runs."""
        if self._background is not None:
            self._poll_background()
        return self._background is not None

    def close(self) -> None:
        """Stop a background compile (the server is shutting down)."""
        if self._background is not None:
            self._background.stop()
            self._background = None

    def _rope_tables(
        self, pos: torch.Tensor, layer_type: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin, ``[T, 1, head_dim]`` in the model dtype (see ``rope``)."""
        probe = torch.empty(1, dtype=self.dtype, device=self.device)
        if layer_type is None:
            cos, sin = self.rotary(probe, pos.unsqueeze(0))
        else:  # Gemma 3: local and global layers rotate with different bases
            cos, sin = self.rotary(probe, pos.unsqueeze(0), layer_type)
        cos = cos[0].unsqueeze(1).to(self.dtype)
        sin = sin[0].unsqueeze(1).to(self.dtype)
        sin[..., : self.head_dim // 2].neg_()  # rotate_half's sign, see compiled.rope
        return cos, sin

    def _compiled_inputs(self, rows: list[StepRow], *, scratch: bool = False) -> tuple[Any, ...]:
        """The compiled graph's arguments for ``rows``: one graph row per token (see
        :meth:`~.compiled.DecodeGraph.forward`), logits for each row with ``need_logits``.

        ``scratch``: the compile's example (every row writes the scratch slot and reads
        the null block), sized so that no two of its dynamic dimensions share a size:
        Inductor would take them for one (rows: even, the logit rows two fewer, the
        context width two more; the adapter stacks' slots and rank are odd)."""
        assert self._compiled is not None
        bs, dev = self.block_size, self.device
        counts = [len(r.token_ids) for r in rows]
        ids = torch.tensor([t for r in rows for t in r.token_ids], device=dev)
        pos = torch.tensor(
            [p for r in rows for p in range(r.start_pos, r.start_pos + len(r.token_ids))],
            device=dev,
        )
        lens = pos + 1
        T = ids.shape[0]
        if scratch:
            width = min(T + 2, self.max_model_len + 16)
            idx = torch.full((T, width), NULL_BLOCK * bs, device=dev)
            slots = torch.full((T,), self.scratch_slot, device=dev)
            wanted = torch.arange(T - 2, device=dev)
        else:
            context = [r.start_pos + n for r, n in zip(rows, counts, strict=True)]
            # Whole blocks, so the dynamic width takes few distinct values.
            width = -(-max(context) // bs) * bs
            table = self._block_tables(rows, context, width)
            if len(rows) != T:  # prompt chunks: each of their tokens reads the row's table
                table = table.repeat_interleave(torch.tensor(counts, device=dev), dim=0)
            slots = table.gather(1, pos.unsqueeze(1)).squeeze(1)
            # Past its own position a row reads the zeroed null block: never uninitialised
            # memory, where a masked-out 0 * NaN would still be NaN.
            k_pos = torch.arange(width, device=dev).unsqueeze(0)
            idx = torch.where(k_pos < lens.unsqueeze(1), table, NULL_BLOCK * bs)
            last = torch.tensor(counts, device=dev).cumsum(0) - 1
            need = torch.tensor([r.need_logits for r in rows], device=dev)
            wanted = last[need] if bool(need.any()) else last[-1:]
        if self.layer_types:  # Gemma 3: global and local layers rotate differently
            glob = self._rope_tables(pos, "full_attention")
            local = self._rope_tables(pos, "sliding_attention") if self._window_size else glob
        else:
            glob = local = self._rope_tables(pos)
        tables = (*glob, *local)
        # The warm-up's adapter stacks are the export's shape hint: sizes above the row
        # count and odd, so that no other dimension of the example has them.
        token_slots = [r.adapter_slot for r, n in zip(rows, counts, strict=True) for _ in range(n)]
        lora = self.lora.graph_inputs(
            token_slots,
            LORA_MODULES,
            hint=2 * T + 3 if scratch else None,
        )
        return ids, tables, slots, idx, lens, self.kv_cache, lora, wanted

    def _run_compiled(self, rows: list[StepRow]) -> torch.Tensor:
        """Rows through the compiled graph: fp32 logits of the rows with ``need_logits``."""
        return drain(self._compiled_stages(rows))

    def _compiled_stages(self, rows: list[StepRow]) -> Generator[None, None, torch.Tensor]:
        """:meth:`_run_compiled`, yielding between the package's stages."""
        assert self._compiled is not None
        logits = yield from self._compiled.run_stages(self._compiled_inputs(rows))
        logits = logits.cpu()
        return logits if any(r.need_logits for r in rows) else logits[:0]

    @torch.inference_mode()
    def step_stages(self, rows: list[StepRow]) -> Generator[None, None, torch.Tensor]:
        """:meth:`step` in the compiled step's stages, yielding between two of them (see
        :meth:`~.compiled.CompiledDecoder.run_stages`); in one go where the rows do not
        run compiled, or the step has one stage."""
        compiled = self._compiled
        if (
            compiled is None
            or not compiled.ready
            or not compiled.paged
            or len(compiled.fns) < 2
            or not rows
            or any(r.all_logits or self._eager_row(r) for r in rows)
        ):
            return self.step(rows)
        return (yield from self._compiled_stages(rows))

    def _step(self, rows: list[StepRow]) -> torch.Tensor:
        if self._compiled is not None and not self._compiled.ready:
            if self._background is not None:
                self._poll_background()
            else:
                self.warmup()  # warmup() was skipped: load (or compile) now
        if (
            self._compiled is not None
            and self._compiled.ready
            and not any(r.all_logits for r in rows)
        ):
            # Embedding rows (hidden states) and rows of an adapter with saved modules run
            # eagerly; the other rows still run compiled: with the paged graph every one of
            # them (prompt chunks are rows of the graph too), else decode rows.
            graph = [i for i, r in enumerate(rows) if not self._eager_row(r)]
            if not self._compiled.paged:
                graph = [i for i in graph if len(rows[i].token_ids) == 1]
                if len(graph) > self._compiled.max_batch_size:
                    graph = []
            if graph:
                return self._split_step(rows, graph)
        return self._eager_step(rows)

    def _eager_row(self, row: StepRow) -> bool:
        """True for a row only the eager step serves: an embedding's (hidden states), or
        one whose adapter replaces the embeddings or the head (modules_to_save)."""
        return row.hidden or self.lora.has_saved(row.adapter_slot)

    def _split_step(self, rows: list[StepRow], decode: list[int]) -> torch.Tensor:
        """Rows ``decode`` through the graph (decode rows; with the paged graph, any row
        but an embedding's), the others eagerly; logits in row order."""
        fast = self._run_compiled([rows[i] for i in decode])
        if len(decode) == len(rows):
            return fast
        in_decode = set(decode)
        slow = self._eager_step([r for i, r in enumerate(rows) if i not in in_decode])
        # Each part holds the logits of its rows with need_logits, in row order.
        fast_rows, slow_rows = iter(fast), iter(slow)
        out = [
            next(fast_rows) if i in in_decode else next(slow_rows)
            for i, row in enumerate(rows)
            if row.need_logits
        ]
        return torch.stack(out) if out else torch.empty(0, self.info.vocab_size)

    def _eager_step(self, rows: list[StepRow]) -> torch.Tensor:
        # Single-token rows first: they share one batched attention call.
        packed = pack_rows(rows, self.block_size)
        ordered, num_decode, dev = packed.rows, packed.num_decode, self.device
        ids, positions, slot_map, lengths = (
            packed.ids,
            packed.positions,
            packed.slots,
            packed.lengths,
        )
        tok = torch.tensor(ids, device=dev)
        pos_t = torch.tensor(positions, device=dev)
        slot_t = torch.tensor(slot_map, device=dev)

        hidden = self.embed(tok)  # [T, H]
        # Adapters with their own embeddings or head (modules_to_save): each token's slot.
        token_slots = packed.token_slots() if self.lora.saves else None
        if token_slots is not None and self._embed_path is not None:
            self.lora.replace_saved(self._embed_path, token_slots, tok, hidden)
        if self.layer_types:
            tables = {t: self._rope_tables(pos_t, t) for t in set(self.layer_types)}
        else:
            tables = {None: self._rope_tables(pos_t)}  # [T, 1, D] each
        plan = self.lora.plan([r.adapter_slot for r in ordered], lengths)
        decode_idx, decode_mask = self._decode_gather(ordered[:num_decode])
        prefill = self._prefill_gathers(ordered, num_decode)
        self._windowed: dict[tuple[Any, ...], torch.Tensor] = {}
        self._decode_ctx = torch.tensor([r.start_pos + 1 for r in ordered[:num_decode]], device=dev)

        for li, layer in enumerate(self.layers):
            cos, sin = tables[self.layer_types[li] if self.layer_types else None]
            residual = hidden
            h = self._norm(layer.input_layernorm, hidden)
            attn_out = self._attention(
                li,
                layer.self_attn,
                h,
                cos,
                sin,
                slot_t,
                plan,
                num_decode,
                decode_idx,
                decode_mask,
                prefill,
            )
            if self.gemma:
                attn_out = self._norm(layer.post_attention_layernorm, attn_out)
            hidden = attn_out.add_(residual)
            residual = hidden
            if self.gemma:
                h = self._norm(layer.pre_feedforward_layernorm, hidden)
                out = self._norm(
                    layer.post_feedforward_layernorm, self._mlp(li, layer.mlp, h, plan)
                )
                hidden = out.add_(residual)
            else:
                h = self._norm(layer.post_attention_layernorm, hidden)
                hidden = self._mlp(li, layer.mlp, h, plan).add_(residual)

        if any(r.hidden for r in ordered):
            put_hidden_states(packed, hidden, lambda h: self._norm(self.norm, h))
        if not packed.wanted:
            return torch.empty(0, self.info.vocab_size)
        last = self._norm(self.norm, hidden[torch.tensor(packed.wanted, device=dev)])
        head: Any = self._packed_head if self._fused is not None else self.lm_head
        logits = head(last).float()
        if token_slots is not None and self._head_path is not None:
            wanted_slots = [token_slots[t] for t in packed.wanted]
            self.lora.replace_saved(self._head_path, wanted_slots, last, logits)
        return logits[torch.tensor(packed.back, device=dev)].cpu()  # the caller's row order

    def _norm(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        """The model's RMSNorm through :func:`rms_norm` (Gemma's (1 + w) form in float32, as
        its module computes it); other norms run their module."""
        scale = self._gemma_scale.get(id(module))
        if scale is not None:
            return (F.rms_norm(x.float(), (x.shape[-1],), None, module.eps) * scale).to(x.dtype)
        eps = getattr(module, "variance_epsilon", None)
        if eps is None:
            return module(x)
        return rms_norm(x, module.weight, eps)

    def _linear(
        self, li: int, module: Any, name: str, x: torch.Tensor, plan: LoraPlan
    ) -> torch.Tensor:
        return self.lora.apply(plan, li, name, x, module(x))

    def _mlp(self, li: int, mlp: Any, h: torch.Tensor, plan: LoraPlan) -> torch.Tensor:
        if self._fused is not None:
            fused = self._fused[li]
            gate, up = fused["gate_up"](h).split(self.lora.module_dims["mlp.gate_proj"][1], dim=-1)
            gate = self.lora.apply(plan, li, "mlp.gate_proj", h, gate)
            up = self.lora.apply(plan, li, "mlp.up_proj", h, up)
            act = mlp.act_fn(gate) * up
            return self.lora.apply(plan, li, "mlp.down_proj", act, fused["down_proj"](act))
        gate = self._linear(li, mlp.gate_proj, "mlp.gate_proj", h, plan)
        up = self._linear(li, mlp.up_proj, "mlp.up_proj", h, plan)
        return self._linear(li, mlp.down_proj, "mlp.down_proj", mlp.act_fn(gate) * up, plan)

    def _block_tables(
        self, rows: list[StepRow], context: list[int], width: int | None = None
    ) -> torch.Tensor:
        """Flat cache indices ``[len(rows), width or max(context)]``, padded with the null block."""
        width = width or max(context)
        nblocks = (width + self.block_size - 1) // self.block_size
        table = torch.full((len(rows), nblocks), NULL_BLOCK, dtype=torch.long)
        for i, row in enumerate(rows):
            used = (context[i] + self.block_size - 1) // self.block_size
            table[i, :used] = torch.tensor(row.block_table[:used])
        flat = table.unsqueeze(-1) * self.block_size + torch.arange(self.block_size)
        return flat.view(len(rows), -1)[:, :width].to(self.device)

    def _decode_gather(
        self, rows: list[StepRow], width: int | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not rows:
            return None, None
        context = [r.start_pos + 1 for r in rows]
        idx = self._block_tables(rows, context, width)
        lens = torch.tensor(context, device=self.device)
        mask = torch.arange(idx.shape[1], device=self.device).unsqueeze(0) < lens.unsqueeze(1)
        # Padding reads the zeroed null block: never uninitialised memory (0 * NaN = NaN).
        idx = torch.where(mask, idx, NULL_BLOCK * self.block_size)
        return idx, mask[:, None, None, :]

    def _prefill_gathers(
        self, rows: list[StepRow], num_decode: int
    ) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """For each prompt-chunk row: (token offset, length, cache index, causal mask)."""
        out = []
        offset = num_decode
        for row in rows[num_decode:]:
            n = len(row.token_ids)
            ctx = row.start_pos + n
            idx = self._block_tables([row], [ctx])[0]
            q_pos = torch.arange(row.start_pos, ctx, device=self.device).unsqueeze(1)
            mask = torch.arange(ctx, device=self.device).unsqueeze(0) <= q_pos
            out.append((offset, n, idx, mask))
            offset += n
        return out

    def _window(self, li: int, kind: Any, mask: torch.Tensor) -> torch.Tensor:
        """``mask`` limited to layer ``li``'s sliding window (unchanged for global layers).

        Decode masks are ``[B, L]`` over positions 0..L-1 of rows whose query sits at
        ``context - 1``; prompt-chunk masks are ``[n, ctx]`` for queries ``ctx - n .. ctx - 1``.
        """
        window = self.windows[li]
        if window is None:
            return mask
        key = (kind, window)
        cached = self._windowed.get(key)
        if cached is not None:
            return cached
        k_pos = torch.arange(mask.shape[-1], device=mask.device).unsqueeze(0)
        if kind == "decode":
            q_pos = (self._decode_ctx - 1).unsqueeze(1)
        else:
            ctx = mask.shape[-1]
            q_pos = torch.arange(ctx - mask.shape[0], ctx, device=mask.device).unsqueeze(1)
        out = self._windowed[key] = mask & window_mask(q_pos, k_pos, window)
        return out

    def _attention(
        self,
        li: int,
        attn: Any,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slot_t: torch.Tensor,
        plan: LoraPlan,
        num_decode: int,
        decode_idx: torch.Tensor | None,
        decode_mask: torch.Tensor | None,
        prefill: list[tuple[int, int, torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        T = h.shape[0]
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        if self._fused is not None:
            qkv = self._fused[li]["qkv"](h)
            q, k, v = qkv.split([q_out, kv_out, kv_out], dim=-1)
            # LoRA deltas land in place, in the fused tensor's views.
            for name, part in (
                ("self_attn.q_proj", q),
                ("self_attn.k_proj", k),
                ("self_attn.v_proj", v),
            ):
                if self.lora.apply(plan, li, name, h, part) is not part:
                    raise AssertionError("LoRA must add in place")  # pragma: no cover
        else:
            qkv = torch.cat(
                [
                    self._linear(li, attn.q_proj, "self_attn.q_proj", h, plan),
                    self._linear(li, attn.k_proj, "self_attn.k_proj", h, plan),
                    self._linear(li, attn.v_proj, "self_attn.v_proj", h, plan),
                ],
                dim=-1,
            )
        # Rotary embedding on queries and keys together: one set of ops, not two.
        qk = qkv[:, : q_out + kv_out].reshape(T, self.num_heads + self.num_kv_heads, self.head_dim)
        if self._qk_norm is not None and self.gemma:  # per head, scaled in float32 (as HF)
            qk = (
                F.rms_norm(qk.float(), (self.head_dim,), None, self._qk_eps) * self._qk_norm[li]
            ).to(qk.dtype)
        elif self._qk_norm is not None:  # per head, in float32, scaled after rounding (as HF)
            qk = F.rms_norm(qk.float(), (self.head_dim,), None, self._qk_eps).to(qk.dtype)
            qk = qk * self._qk_norm[li]
        qk = rope(qk, cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, q_out + kv_out :].reshape(T, self.num_kv_heads, self.head_dim)
        cache = self.kv_cache[li]
        cache[:, 0].index_copy_(0, slot_t, k)
        cache[:, 1].index_copy_(0, slot_t, v)

        out = torch.empty(T, self.num_heads, self.head_dim, dtype=q.dtype, device=q.device)
        if num_decode:
            assert decode_idx is not None
            B, L = decode_idx.shape
            kv = cache.index_select(0, decode_idx.reshape(-1)).view(
                B, L, 2, self.num_kv_heads, self.head_dim
            )
            kd = kv[:, :, 0].transpose(1, 2)  # [B, kv, L, D]
            vd = kv[:, :, 1].transpose(1, 2)
            assert decode_mask is not None
            out[:num_decode] = decode_attention(
                q[:num_decode],
                kd,
                vd,
                self._window(li, "decode", decode_mask[:, 0, 0, :]),
                self.scaling,
            )
        for offset, n, idx, mask in prefill:
            kv = cache.index_select(0, idx)
            kp = kv[:, 0].transpose(0, 1).unsqueeze(0)  # [1, kv, L, D]
            vp = kv[:, 1].transpose(0, 1).unsqueeze(0)
            qp = q[offset : offset + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            op = F.scaled_dot_product_attention(
                qp,
                kp,
                vp,
                attn_mask=self._window(li, ("prefill", offset), mask),
                scale=self.scaling,
                enable_gqa=True,
            )
            out[offset : offset + n] = op[0].transpose(0, 1)
        o = out.view(T, self.num_heads * self.head_dim)
        if self._fused is not None:
            return self.lora.apply(plan, li, "self_attn.o_proj", o, self._fused[li]["o_proj"](o))
        return self._linear(li, attn.o_proj, "self_attn.o_proj", o, plan)
