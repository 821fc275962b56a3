"""The generic runner: any transformers causal LM, through the model's own modeling code.

The fast runner (:mod:`.torch_runner`) re-implements the Llama family's decoder step.
This one runs whatever the model's ``forward`` does (its norms, rotary variant, MoE
routing, soft-capping, embedding scale, per-layer sliding windows) and replaces only
attention, the one place where the rows of a continuous batch meet. That is how vLLM's
Transformers backend serves arbitrary models:

- all rows' tokens are packed into one sequence (``input_ids [1, T]``) with per-token
  ``position_ids``, so every token-wise module sees one tensor and no padding;
- an attention function registered through transformers' ``AttentionInterface``
  writes each layer's keys and values into the paged block pool and attends every row
  over its own blocks (causal; honouring the layer's ``sliding_window``, ``scaling``,
  logit soft-cap and attention sinks). Single-token rows share one batched call;
- per-row LoRA deltas are added by forward hooks on the Linear modules of the decoder
  layers, through the same :class:`~openllm_clone.runners.lora.LoraBank` as the fast
  runner, whatever the modules are called (``q_proj``, ``c_attn``,
  ``query_key_value``, ``fc1``, ...);
- ``logits_to_keep`` asks the model for logits at the rows' last tokens only, so the
  model's own final soft-cap or logit scale still applies.

At load the runner checks itself against the model: a few tokens run once through
transformers' eager attention and again through the paged path (prefill, then one
token at a time) must give the same logits. A model that keeps state outside attention
(state-space or convolution layers), has no attention layers, or computes attention
biases of its own (ALiBi) fails that check and is refused with the reason.

KV blocks are kept for the whole sequence even in sliding-window layers: a block that
left one layer's window is still read by the model's global layers (Gemma 2/3), and
blocks are shared by prefix caching; freeing per layer would need one block table per
layer kind. The window is applied as a mask.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from openllm_clone.errors import ModelLoadError

from .attention import attend, decode_attention, window_mask
from .attention_hook import (
    ATTENTION_NAME,
    NO_ATTENTION,
    Probe,
    install_paged_attention,
    local,
    probe_attention,
)
from .base import ModelInfo, StepRow, pack_rows, put_hidden_states
from .dora import ReleasedWeights, dora_base
from .lora import LoraBank, LoraPlan, saved_targets

__all__ = ["GenericRunner"]

logger = logging.getLogger(__name__)

NULL_BLOCK = 0  # a zeroed block that padded attention reads point at
_LAYER_PATH = re.compile(r"^(?P<container>.+?)\.(?P<layer>\d+)\.")
# Tokens in the self-check: a prompt chunk, then one token at a time.
_CHECK_PREFILL, _CHECK_DECODE = 6, 3


@dataclass
class _StepState:
    """The paged-attention metadata of one step, shared by every layer's attention call."""

    slots: torch.Tensor  # [T] cache slot of every packed token
    num_decode: int
    decode_idx: torch.Tensor | None  # [B, L] cache slots of each decode row's context
    decode_ctx: torch.Tensor | None  # [B] context length of each decode row
    prefill: list[tuple[int, int, int, torch.Tensor]]  # (offset, n, start_pos, slots [ctx])
    layer: int = 0
    masks: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)


def linear_dims(module: Any) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a Linear-like module (plain, quantized, or GPT-2's
    ``Conv1D``), or None for anything else."""
    if isinstance(module, torch.nn.Linear):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        weight = module.weight  # [in, out]
        return int(weight.shape[0]), int(weight.shape[1])
    if list(module.children()):
        return None
    in_features = getattr(module, "in_features", None)
    out_features = getattr(module, "out_features", None)
    if isinstance(in_features, int) and isinstance(out_features, int):
        return in_features, out_features  # GPTQ's QuantLinear and friends
    return None


class GenericRunner:
    """Executes steps on any transformers causal LM with a paged KV cache and LoRA slots."""

    tier = "generic"

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
    ) -> None:
        self.model = model.eval()
        self.config = model.config
        config = self.config
        model_type = getattr(config, "model_type", type(model).__name__)
        refusal = install_paged_attention(model)
        if refusal is not None:
            raise ModelLoadError(f"model type {model_type!r}: {refusal}; no runner can serve it")
        self._keep_takes_tensor = "logits_to_keep" in inspect.signature(model.forward).parameters
        embed = model.get_input_embeddings()
        self.device = embed.weight.device
        self.dtype = embed.weight.dtype if embed.weight.dtype.is_floating_point else torch.float32
        probes = self._probe(model_type)
        self.attention_layers = len(probes)
        self._layer_of = {id(p.module): i for i, p in enumerate(probes)}
        container, layers = self._decoder_layers(probes, model_type)
        self.layers = layers
        self.num_layers = len(layers)
        model_max = int(
            getattr(config, "max_position_embeddings", None)
            or getattr(config, "n_positions", None)
            or 2048
        )
        self.max_model_len = min(max_model_len or model_max, model_max)

        # KV pool: one K and one V tensor per attention layer, [slots, kv_heads, dim].
        self.block_size = block_size
        per_token_bytes = sum(p.kv_heads * (p.k_dim + p.v_dim) * _itemsize(p.dtype) for p in probes)
        self.kv_bytes_per_token = per_token_bytes
        self.num_blocks = max(2, kv_cache_bytes // (per_token_bytes * block_size))
        slots = self.num_blocks * block_size
        # Zeroed: the pool is resident from the start (see the fast runner).
        self.k_cache = [
            torch.zeros(slots, p.kv_heads, p.k_dim, dtype=p.dtype, device=self.device)
            for p in probes
        ]
        self.v_cache = [
            torch.zeros(slots, p.kv_heads, p.v_dim, dtype=p.dtype, device=self.device)
            for p in probes
        ]

        # LoRA: every Linear-like module of the decoder layers that sees every token.
        self._plan: LoraPlan | None = None
        targets = self._lora_targets(container)
        dims = {name: d for name, (d, _) in targets.items()}
        self.lora = LoraBank(
            dims,
            self.num_layers,
            max_adapters,
            dtype=self.dtype,
            device=self.device,
            module_layers={name: set(ls) for name, (_, ls) in targets.items()},
        )
        self._hooks = []
        for name, (_, per_layer) in targets.items():
            for li, module in per_layer.items():
                self._hooks.append(module.register_forward_hook(self._lora_hook(li, name)))
        # DoRA reads the base projections' weights (or what packing kept of them); an
        # adapter's saved embeddings or head replace the model's for its tokens (hooks on
        # the two modules, which see each token / each kept row in packed order).
        self._released = ReleasedWeights()
        self.lora.dora_base = dora_base(self.layers, self._released, self.dtype)
        self.lora.saved_modules = saved_targets(model)
        self._token_slots: list[int] = []
        self._replacing = False
        self._wanted_slots: list[int] = []
        embeddings = model.get_input_embeddings()
        for path, (module, _) in self.lora.saved_modules.items():
            hook = self._saved_hook(path, embeddings=module is embeddings)
            self._hooks.append(module.register_forward_hook(hook))

        weight_bytes = sum(
            t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
        )
        num_parameters = sum(p.numel() for p in model.parameters())
        head = model.get_output_embeddings()
        vocab_size = int(head.weight.shape[0] if head is not None else config.vocab_size)
        self.packed_linears = self._pack_linears()  # after reading shapes: it frees weights
        self.info = ModelInfo(
            model_id=model_id,
            architecture=(getattr(config, "architectures", None) or [type(model).__name__])[0],
            dtype=str(self.dtype).replace("torch.", ""),
            device=str(self.device),
            max_model_len=self.max_model_len,
            vocab_size=vocab_size,
            hidden_size=int(getattr(config, "hidden_size", 0) or 0),
            num_parameters=num_parameters,
            weight_bytes=weight_bytes,
            quantization=quantization,
            extra={"runner": self.tier, "packed_linears": self.packed_linears},
        )
        self._self_check(model_type)

    # --- set-up ---------------------------------------------------------------------

    def _probe(self, model_type: str) -> list[Probe]:
        """One small forward that records every attention call's module and shapes."""
        try:
            probes = probe_attention(self.model, 4, self.device)
        except Exception as exc:  # the model's own code failed on a plain forward
            raise ModelLoadError(
                f"model type {model_type!r}: a forward with paged attention "
                f"failed ({type(exc).__name__}: {exc})"
            ) from exc
        if not probes:
            raise ModelLoadError(
                f"model type {model_type!r}: {NO_ATTENTION}; no runner can serve it"
            )
        if len({id(p.module) for p in probes}) != len(probes):
            raise ModelLoadError(
                f"model type {model_type!r} calls one attention module twice per "
                "forward; no runner can serve it"
            )
        return probes

    def _decoder_layers(self, probes: list[Probe], model_type: str) -> tuple[str, list[Any]]:
        """The ModuleList of decoder layers that holds the attention modules."""
        names = {id(m): n for n, m in self.model.named_modules()}
        containers = set()
        for p in probes:
            match = _LAYER_PATH.match(names.get(id(p.module), ""))
            if match is None:
                raise ModelLoadError(
                    f"model type {model_type!r}: cannot find the decoder layer "
                    f"of attention module {names.get(id(p.module))!r}"
                )
            containers.add(match["container"])
        if len(containers) != 1:
            raise ModelLoadError(
                f"model type {model_type!r}: attention modules in several layer "
                f"lists {sorted(containers)}; no runner can serve it"
            )
        container = containers.pop()
        layers = list(self.model.get_submodule(container))
        return container, layers

    def _lora_targets(self, container: str) -> dict[str, tuple[tuple[int, int], dict[int, Any]]]:
        """Module path inside a decoder layer -> (dims, {layer: module}).

        A path whose dims differ between layers, or whose module sees only some tokens
        (MoE experts), is left out: an adapter targeting it is refused at validation.
        """
        found: dict[str, tuple[tuple[int, int], dict[int, Any]]] = {}
        mixed: set[str] = set()
        for li, layer in enumerate(self.layers):
            for name, module in layer.named_modules():
                if not name or "experts" in name.split("."):
                    continue
                dims = linear_dims(module)
                if dims is None:
                    continue
                if name in found and found[name][0] != dims:
                    mixed.add(name)
                found.setdefault(name, (dims, {}))[1][li] = module
        seen: dict[int, int] = {}
        tokens = 16
        handles = [
            m.register_forward_hook(_count_tokens(seen, id(m)))
            for _, per_layer in found.values()
            for m in per_layer.values()
        ]
        try:
            probe_attention(self.model, tokens, self.device)
        finally:
            for h in handles:
                h.remove()
        partial = {
            name
            for name, (dims, per_layer) in found.items()
            if any(seen.get(id(m), tokens) != tokens for m in per_layer.values())
        }
        for name in sorted(mixed | partial):
            logger.info(
                "adapters cannot target %s.*.%s (%s)",
                container,
                name,
                "its shape differs between layers"
                if name in mixed
                else "it sees only routed tokens",
            )
        return {n: v for n, v in found.items() if n not in mixed and n not in partial}

    def _self_check(self, model_type: str) -> None:
        """The paged path must compute what the model computes with its eager attention."""
        vocab = self.info.vocab_size
        n = _CHECK_PREFILL + _CHECK_DECODE
        ids = [(7 * i + 3) % max(vocab - 1, 1) + 1 for i in range(n)]
        with torch.inference_mode():
            self.model.set_attn_implementation("eager")
            try:
                kwargs: dict[str, Any] = {"use_cache": False}
                ref = (
                    self.model(
                        input_ids=torch.tensor([ids], device=self.device),
                        position_ids=torch.arange(n, device=self.device).unsqueeze(0),
                        **kwargs,
                    )
                    .logits[0, _CHECK_PREFILL - 1 :]
                    .float()
                    .cpu()
                )
            finally:
                self.model.set_attn_implementation(ATTENTION_NAME)
            blocks = list(range(1, 1 + -(-n // self.block_size)))
            if blocks[-1] >= self.num_blocks:
                return  # a pool too small to check in: nothing would fit anyway
            got = [self.step([StepRow(ids[:_CHECK_PREFILL], 0, blocks)])[0]]
            for i in range(_CHECK_PREFILL, n - 1):
                got.append(self.step([StepRow([ids[i]], i, blocks)])[0])
        ours = torch.stack(got).float()
        scale = ref.abs().max().clamp_min(1e-6)
        err = float((ours - ref[: len(got)]).abs().max() / scale)
        limit = 1e-3 if self.dtype == torch.float32 and self.info.quantization is None else 0.08
        if not err <= limit:
            raise ModelLoadError(
                f"model type {model_type!r}: run one token at a time over the paged KV cache, the "
                f"model does not compute what its own forward computes (relative error {err:.3g}); "
                "it keeps state outside attention (state-space or convolution layers) or biases "
                "attention itself (ALiBi), which no runner here supports"
            )
        logger.info("generic runner self-check passed (relative error %.2g)", err)

    def _pack_linears(self) -> int:
        """Run plain bf16 or float32 Linear modules through oneDNN-prepacked weights (CPU),
        as the fast runner does (see :mod:`.packed`). A weight no other module shares is
        released (the packed copy replaces it); quantized layers keep their own modules."""
        from .packed import PackedLinear, packed_linears_work

        if self.device.type != "cpu" or not packed_linears_work(self.dtype):
            return 0
        owners: dict[int, int] = {}
        for module in self.model.modules():
            for param in module.parameters(recurse=False):
                owners[param.data_ptr()] = owners.get(param.data_ptr(), 0) + 1
        count = 0
        for module in self.model.modules():
            weight = getattr(module, "weight", None)
            if (
                type(module) is not torch.nn.Linear
                or weight is None
                or type(weight.data) is not torch.Tensor
                or weight.dtype != self.dtype
            ):
                continue
            packed = PackedLinear(weight, module.bias)
            module.forward = _packed_forward(packed)  # type: ignore[method-assign]
            if owners.get(weight.data_ptr(), 0) == 1:
                self._released.keep(module, weight, packed)
                module.weight = torch.nn.Parameter(
                    torch.empty(0, dtype=weight.dtype), requires_grad=False
                )
            count += 1
        return count

    # --- the step -------------------------------------------------------------------

    @contextlib.contextmanager
    def _stepping(self) -> Iterator[None]:
        previous = local.runner
        local.runner = self
        try:
            yield
        finally:
            local.runner = previous

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one KV block in every layer (copy-on-write for forked samples)."""
        bs = self.block_size
        for cache in (*self.k_cache, *self.v_cache):
            cache[dst * bs : (dst + 1) * bs].copy_(cache[src * bs : (src + 1) * bs])

    @property
    def compiled(self) -> bool:
        """The generic runner has no compiled step."""
        return False

    def compiled_stats(self) -> dict[str, Any] | None:
        """Nothing runs compiled."""
        return None

    def warmup(self) -> None:
        """Nothing to compile."""

    def warmup_compiles(self) -> bool:
        """Nothing to compile."""
        return False

    def close(self) -> None:
        """Nothing to release."""

    def idle(self) -> bool:
        """Nothing waits for a step."""
        return False

    @torch.inference_mode()
    def step(self, rows: list[StepRow]) -> torch.Tensor:
        """One forward over packed rows; fp32 logits as :func:`~.base.logit_rows` says."""
        if not rows:
            return torch.empty(0, self.info.vocab_size)
        with self._stepping():
            return self._forward_rows(rows)

    def _forward_rows(self, rows: list[StepRow]) -> torch.Tensor:
        packed = pack_rows(rows, self.block_size)
        ordered, num_decode, dev = packed.rows, packed.num_decode, self.device
        state = _StepState(
            slots=torch.tensor(packed.slots, device=dev),
            num_decode=num_decode,
            decode_idx=None,
            decode_ctx=None,
            prefill=[],
        )
        if num_decode:
            ctx = [r.start_pos + 1 for r in ordered[:num_decode]]
            state.decode_idx = self._slot_table(ordered[:num_decode], ctx)
            state.decode_ctx = torch.tensor(ctx, device=dev)
        offset = num_decode
        for row in ordered[num_decode:]:
            n = len(row.token_ids)
            state.prefill.append(
                (offset, n, row.start_pos, self._slot_table([row], [row.start_pos + n])[0])
            )
            offset += n
        self._plan = self.lora.plan([r.adapter_slot for r in ordered], packed.lengths)
        self._state = state
        if self.lora.saves:
            self._token_slots = packed.token_slots()
            self._wanted_slots = [self._token_slots[t] for t in packed.wanted or [0]]
        try:
            kwargs: dict[str, Any] = {"use_cache": False}
            keep = torch.tensor(packed.wanted or [0], device=dev)
            if self._keep_takes_tensor:
                kwargs["logits_to_keep"] = keep
            hidden = any(r.hidden for r in ordered)
            out = self.model(
                input_ids=torch.tensor([packed.ids], device=dev),
                position_ids=torch.tensor([packed.positions], device=dev),
                output_hidden_states=hidden,
                **kwargs,
            )
        finally:
            self._plan = None
        if hidden:  # the last of them is after the final norm (the base model's output)
            put_hidden_states(packed, out.hidden_states[-1][0])
        if not packed.wanted:
            return torch.empty(0, self.info.vocab_size)
        logits = out.logits[0]
        if not self._keep_takes_tensor:
            logits = logits[keep]
        return logits[torch.tensor(packed.back, device=dev)].float().cpu()

    def _slot_table(self, rows: list[StepRow], context: list[int]) -> torch.Tensor:
        """Cache slots ``[len(rows), max(context)]``, padded with the null block's first slot."""
        width = max(context)
        nblocks = -(-width // self.block_size)
        table = torch.full((len(rows), nblocks), NULL_BLOCK, dtype=torch.long)
        for i, row in enumerate(rows):
            used = -(-context[i] // self.block_size)
            table[i, :used] = torch.tensor(row.block_table[:used])
        flat = (table.unsqueeze(-1) * self.block_size + torch.arange(self.block_size)).view(
            len(rows), -1
        )
        flat = flat[:, :width]
        pad = torch.arange(width).unsqueeze(0) >= torch.tensor(context).unsqueeze(1)
        return flat.masked_fill(pad, NULL_BLOCK * self.block_size).to(self.device)

    def _paged(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        window: int | None,
        softcap: float | None,
        sinks: torch.Tensor | None,
    ) -> torch.Tensor:
        """Write this layer's K/V into the pool, attend each row over its blocks."""
        state = self._state
        li = state.layer
        state.layer = (li + 1) % self.attention_layers
        k_cache, v_cache = self.k_cache[li], self.v_cache[li]
        k_cache.index_copy_(0, state.slots, key[0].transpose(0, 1).to(k_cache.dtype))
        v_cache.index_copy_(0, state.slots, value[0].transpose(0, 1).to(v_cache.dtype))
        q = query[0]  # [H, T, D]
        H, T = q.shape[0], q.shape[1]
        out = torch.empty(T, H, value.shape[-1], dtype=query.dtype, device=query.device)
        nd = state.num_decode
        if nd:
            assert state.decode_idx is not None and state.decode_ctx is not None
            B, L = state.decode_idx.shape
            flat = state.decode_idx.reshape(-1)
            kd = k_cache.index_select(0, flat).view(B, L, *k_cache.shape[1:]).transpose(1, 2)
            vd = v_cache.index_select(0, flat).view(B, L, *v_cache.shape[1:]).transpose(1, 2)
            key_ = ("decode", window)
            mask = state.masks.get(key_)
            if mask is None:
                ctx = state.decode_ctx
                k_pos = torch.arange(L, device=q.device).unsqueeze(0)
                mask = state.masks[key_] = window_mask((ctx - 1).unsqueeze(1), k_pos, window)
            qd = q[:, :nd].transpose(0, 1)  # [B, H, D]
            out[:nd] = decode_attention(
                qd, kd.to(q.dtype), vd.to(q.dtype), mask, scaling, softcap, sinks
            )
        for i, (offset, n, start, idx) in enumerate(state.prefill):
            kp = k_cache.index_select(0, idx).transpose(0, 1).unsqueeze(0)  # [1, KV, ctx, D]
            vp = v_cache.index_select(0, idx).transpose(0, 1).unsqueeze(0)
            pkey = ("prefill", i, window)
            mask = state.masks.get(pkey)
            if mask is None:
                q_pos = torch.arange(start, start + n, device=q.device).unsqueeze(1)
                k_pos = torch.arange(idx.shape[0], device=q.device).unsqueeze(0)
                mask = state.masks[pkey] = window_mask(q_pos, k_pos, window)
            qp = q[:, offset : offset + n].unsqueeze(0)  # [1, H, n, D]
            op = attend(qp, kp.to(q.dtype), vp.to(q.dtype), mask, scaling, softcap, sinks)
            out[offset : offset + n] = op[0].transpose(0, 1)
        return out.unsqueeze(0)

    def _saved_hook(self, path: str, embeddings: bool) -> Any:
        """Replace the output of the input embeddings (a row per token) or of the head (a
        row per kept token, or per token where the model takes no ``logits_to_keep``
        tensor) for the rows whose adapter saved that module."""
        bank = self.lora
        per_kept_row = not embeddings and self._keep_takes_tensor

        def hook(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            # (the replacement runs the module's own forward, which comes back here)
            if self._plan is None or not bank.saves or self._replacing:
                return None
            x = args[0].reshape(-1) if embeddings else args[0].reshape(-1, args[0].shape[-1])
            slots = self._wanted_slots if per_kept_row else self._token_slots
            if len(slots) != x.shape[0]:
                raise AssertionError(f"{path}: {x.shape[0]} rows, {len(slots)} slots")
            if not any(bank.has_saved(s) for s in set(slots)):
                return None
            y = output.reshape(x.shape[0], -1).clone()
            self._replacing = True
            try:
                return bank.replace_saved(path, slots, x, y).view(output.shape)
            finally:
                self._replacing = False

        return hook

    def _lora_hook(self, layer: int, name: str) -> Any:
        bank = self.lora

        def hook(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            plan = self._plan
            if plan is None or plan.empty:
                return None
            x = args[0]
            y = output.reshape(-1, output.shape[-1])
            return bank.apply(plan, layer, name, x.reshape(-1, x.shape[-1]), y).view(output.shape)

        return hook


def _packed_forward(packed: Any) -> Any:
    out_features = packed.out_features

    def forward(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return packed(x.reshape(-1, shape[-1])).view(*shape[:-1], out_features)

    return forward


def _count_tokens(seen: dict[int, int], key: int) -> Any:
    def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            seen[key] = min(seen.get(key, 1 << 30), int(x.numel() // max(x.shape[-1], 1)))

    return hook


def _itemsize(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()
