"""Batched LoRA for many adapters in one step (the Punica / S-LoRA / LoRAX idea, on CPU).

Each adapted projection keeps two stacks over adapter slots, ``A[layer, slot, rank,
in]`` and ``B[layer, slot, rank, out]`` (the LoRA scale folded into ``B``); slot 0
is "no adapter" and stays zero. A step computes one :class:`LoraPlan` from the rows'
slots and reuses it in all layers. Two ways to apply it, both exact:

* **per token** (decode steps with several adapters, the common serving case): the
  stacks of each row's adapter are gathered once into ``A_tok[layer, T, in, r]`` and
  ``B_tok[layer, T, r, out]``, kept while the batch keeps the same rows, so each
  projection costs two batched matrix-vector products, one per token with its own
  adapter (the segmented gather-matmul of Punica/S-LoRA with segments of one token)::

      delta[t] = (x[t] @ A_tok[t].T) @ B_tok[t]

  That is the least work there is: every adapter's weights are read once per step.
* **masked** (prefill steps, or batches too large for the per-token cache): for the
  ``n`` distinct adapters in the step, ``A`` and ``B`` are concatenated along the rank
  axis and a mask keeps, for every token, only the rank columns of its own adapter::

      delta = ((x @ A_active.T) * mask) @ B_active        # [T, n*r] -> [T, out]

Small bf16 matmuls are slow on CPU, so the LoRA math runs in float32 (the stacks are
stored in the model dtype and converted when first used by a step, then cached under
a byte budget).

DoRA (peft ``use_dora``) rescales each output of an adapted projection by ``g = m /
||W + s B A||`` (the adapter's magnitude over the column norm of the adapted weight,
computed once when the adapter is installed, as peft computes it): ``y = g * (W x + s B A
x) + (1 - g) * bias``. The bank keeps ``g`` and ``(1 - g) * bias`` per slot (1 and 0 for
every other slot), so a step rescales the tokens of DoRA rows after adding the delta and
LoRA and base rows in the same step are unchanged.

Whole modules an adapter saved (``modules_to_save``: its own ``lm_head`` or
``embed_tokens``) replace the base module for that adapter's tokens only
(:meth:`LoraBank.replace_saved`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from openllm_clone.errors import AdapterIncompatibleError

if TYPE_CHECKING:
    from openllm_clone.adapters.weights import AdapterWeights, LoraModule

# What DoRA needs of the base model, given by the runner: the column norm
# ``||W + scale * B @ A||`` of an adapted projection (float32 [out]) and its bias.
DoraBase = Callable[[int, str, "LoraModule"], tuple[torch.Tensor, "torch.Tensor | None"]]

__all__ = ["LoraBank", "LoraPlan", "saved_targets"]

_COMPUTE_DTYPE = torch.float32
# Converted stacks kept between steps (per active set, or per batch of decode rows).
_CACHE_BYTES = 512 * 2**20
# A decode batch uses per-token stacks when it has at least this many distinct
# adapters (with fewer, the masked concat does less work: measured on SmolLM2, 16 rows
# over 4 adapters ran at 0.80x the no-adapter speed masked, 0.67x per token) and the
# stacks fit in this much memory.
_PER_TOKEN_MIN_ADAPTERS = 8
_PER_TOKEN_BYTES = 256 * 2**20


@dataclass
class LoraPlan:
    """How to apply adapters to the packed tokens of one step."""

    active: tuple[int, ...] = ()
    mask: torch.Tensor | None = None  # [T, n*r]; None when every token has active[0]
    per_token: tuple[int, ...] | None = None  # each token's slot, for the per-token path
    # DoRA: the modules some active adapter rescales, and each token's slot (None when
    # every token has active[0]); the per-token scales of a module, gathered for every
    # layer at its first use in the step.
    dora: frozenset[str] = frozenset()
    tokens: torch.Tensor | None = None
    _scales: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # The last input converted to float32: q/k/v (and gate/up) share their input.
    _x: torch.Tensor | None = None
    _x32: torch.Tensor | None = None

    def as_compute(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the LoRA compute dtype, converted once per distinct input."""
        if x.dtype == _COMPUTE_DTYPE:
            return x
        if self._x is not x:
            self._x, self._x32 = x, x.to(_COMPUTE_DTYPE)
        assert self._x32 is not None
        return self._x32

    @property
    def empty(self) -> bool:
        """True when no token has an adapter."""
        return not self.active


def saved_targets(model: Any) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """The modules an adapter may replace whole (peft ``modules_to_save``): the model's
    input embeddings and output head, by their paths in the model, with their weights'
    shapes (read before packing releases a weight)."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = getattr(module, "weight", None)
        if module is not None and id(module) in names and isinstance(weight, torch.Tensor):
            out[names[id(module)]] = (module, tuple(weight.shape))
    return out


class LoraBank:
    """Adapter weights for every slot, stacked per projection, ready for a step."""

    def __init__(
        self,
        module_dims: dict[str, tuple[int, int]],
        num_layers: int,
        num_slots: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        module_layers: dict[str, set[int]] | None = None,
    ) -> None:
        self.module_dims = module_dims
        # Layers that have each module (all of them unless given).
        self.module_layers = module_layers or {name: set(range(num_layers)) for name in module_dims}
        self.num_layers = num_layers
        self.num_slots = num_slots  # usable slots; index 0 is reserved for "none"
        self.dtype = dtype
        self.device = device
        self.rank = 0
        self._a: dict[str, torch.Tensor] = {}
        self._b: dict[str, torch.Tensor] = {}
        self._module_slots: dict[str, set[int]] = {name: set() for name in module_dims}
        # (kind, slots) -> module -> (A, B) in float32, least recently used first:
        # ("set", active) -> (A [L, n*r, in], B [L, n*r, out]) for the masked path;
        # ("tok", token slots) -> (A [L, T, in, r], B [L, T, r, out]) per token.
        self._cache: OrderedDict[
            tuple[str, tuple[int, ...]], dict[str, tuple[torch.Tensor, torch.Tensor]]
        ] = OrderedDict()
        self._cache_bytes: dict[tuple[str, tuple[int, ...]], int] = {}
        # Per-token buffers for decode batches (see _token_stacks).
        self._tok_key: tuple[int, ...] | None = None
        self._tok_cap = 0
        self._tok_a: dict[str, torch.Tensor] = {}
        self._tok_b: dict[str, torch.Tensor] = {}
        self._tok_views: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # The compiled step's adapter inputs before any adapter is installed.
        self._zero_stacks: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        # DoRA: per module, g [L, S+1, out] (1 outside DoRA slots) and (1 - g) * bias
        # [L, S+1, out] (0 outside), float32, made at the first DoRA adapter or compiled
        # step; the runner's view of the base weights (see DoraBase).
        self.dora_base: DoraBase | None = None
        self._g: dict[str, torch.Tensor] = {}
        self._c: dict[str, torch.Tensor] = {}
        self._dora_slots: dict[str, set[int]] = {name: set() for name in module_dims}
        # modules_to_save: the module paths an adapter may replace (the runner's input
        # embeddings and output head) with their weights' shapes, and each slot's weights.
        self.saved_modules: dict[str, tuple[Any, tuple[int, ...]]] = {}
        self._saved: dict[int, dict[str, torch.Tensor]] = {}

    def stack_bytes(self) -> int:
        """Bytes of the float32 stacks kept between steps: the per-active-set cache (at
        most ``_CACHE_BYTES``) and the per-token buffers."""
        tok = sum(
            t.numel() * t.element_size() for d in (self._tok_a, self._tok_b) for t in d.values()
        )
        return sum(self._cache_bytes.values()) + tok

    # --- validation and installation -------------------------------------------------

    def validate(self, weights: AdapterWeights, *, max_rank: int) -> None:
        """Raise AdapterIncompatibleError unless ``weights`` fit this model."""
        if weights.dora and self.dora_base is None:
            raise AdapterIncompatibleError("this runner does not serve DoRA adapters")
        self._validate_saved(weights)
        if weights.rank > max_rank:
            raise AdapterIncompatibleError(
                f"adapter rank {weights.rank} exceeds the server's limit {max_rank} "
                "(--max-adapter-rank)"
            )
        for (layer, module), lora in weights.modules.items():
            if module not in self.module_dims:
                raise AdapterIncompatibleError(
                    f"target module {module!r} does not exist in the base model "
                    f"(it has {sorted(self.module_dims)})"
                )
            if layer >= self.num_layers:
                raise AdapterIncompatibleError(
                    f"adapter has layer {layer}; the base model has {self.num_layers} layers"
                )
            if layer not in self.module_layers[module]:
                raise AdapterIncompatibleError(
                    f"target module {module!r} does not exist in layer {layer} of the base model"
                )
            in_features, out_features = self.module_dims[module]
            if lora.a.shape[1] != in_features or lora.b.shape[0] != out_features:
                raise AdapterIncompatibleError(
                    f"layer {layer} {module}: adapter shapes A{tuple(lora.a.shape)} "
                    f"B{tuple(lora.b.shape)} do not fit the base model's "
                    f"{in_features} -> {out_features} projection"
                )

    def _validate_saved(self, weights: AdapterWeights) -> None:
        """A saved module must be the input embeddings or the output head, same shape."""
        for path, tensor in weights.saved.items():
            known = self.saved_modules.get(path)
            if known is None:
                served = " and ".join(sorted(self.saved_modules)) or "no module"
                raise AdapterIncompatibleError(
                    f"the adapter saves the whole module {path!r} (modules_to_save); per "
                    f"request this server replaces {served} only"
                )
            shape = known[1]
            if tuple(tensor.shape) != shape:
                if tensor.dim() == 2 and len(shape) == 2 and tensor.shape[1] == shape[1]:
                    raise AdapterIncompatibleError(
                        f"the adapter's {path} has {tensor.shape[0]} rows and the base "
                        f"model's {shape[0]}: it was trained with tokens added to the "
                        "vocabulary, which need the adapter's own tokenizer, and a server "
                        "serves its base model's; merge it (peft merge_and_unload) and serve "
                        "it as a model of its own"
                    )
                raise AdapterIncompatibleError(
                    f"the adapter's {path} is {tuple(tensor.shape)}; the base model's is {shape}"
                )

    def _grow(self, rank: int) -> None:
        """Make room for ``rank``; existing slots are copied, zero-padded. At least rank 2
        (the compiled step's smallest)."""
        rank = max(rank, 2)
        if rank <= self.rank:
            return
        for name, (in_features, out_features) in self.module_dims.items():
            a = torch.zeros(
                self.num_layers,
                self.num_slots + 1,
                rank,
                in_features,
                dtype=self.dtype,
                device=self.device,
            )
            b = torch.zeros(
                self.num_layers,
                self.num_slots + 1,
                rank,
                out_features,
                dtype=self.dtype,
                device=self.device,
            )
            if name in self._a:
                a[:, :, : self.rank].copy_(self._a[name])
                b[:, :, : self.rank].copy_(self._b[name])
            self._a[name], self._b[name] = a, b
        self.rank = rank
        self._cache.clear()
        self._cache_bytes.clear()
        self._tok_key, self._tok_cap, self._tok_a, self._tok_b = None, 0, {}, {}

    def install(self, slot: int, weights: AdapterWeights) -> None:
        """Write an adapter into ``slot`` (the caller guarantees no step is running)."""
        if not 1 <= slot <= self.num_slots:
            raise ValueError(f"slot {slot} out of range 1..{self.num_slots}")
        self._grow(weights.rank)
        self.clear(slot)
        # DoRA's scales first: computing a norm may fail (an unreadable base weight),
        # and then nothing of the adapter is in the slot.
        scales = {}
        for (layer, module), lora in weights.modules.items():
            if lora.magnitude is not None:
                assert self.dora_base is not None  # validate() refused DoRA otherwise
                norm, bias = self.dora_base(layer, module, lora)
                g = lora.magnitude.float().to(self.device) / norm
                c = (1.0 - g) * bias.float() if bias is not None else torch.zeros_like(g)
                scales[(layer, module)] = (g, c)
        for (layer, module), lora in weights.modules.items():
            rank = lora.a.shape[0]
            self._a[module][layer, slot, :rank].copy_(lora.a)
            self._b[module][layer, slot, :rank].copy_((lora.b * lora.scale).T)
            self._module_slots[module].add(slot)
        for (layer, module), (g, c) in scales.items():
            g_stack, c_stack = self._dora_stacks(module)
            g_stack[layer, slot].copy_(g)
            c_stack[layer, slot].copy_(c)
            self._dora_slots[module].add(slot)
        if weights.saved:
            self._saved[slot] = {
                path: t.to(device=self.device, dtype=self.dtype)
                for path, t in weights.saved.items()
            }
        self._forget(slot)

    def clear(self, slot: int) -> None:
        """Zero ``slot`` so that it adds nothing."""
        for module, slots in self._module_slots.items():
            if slot in slots:
                self._a[module][:, slot].zero_()
                self._b[module][:, slot].zero_()
                slots.discard(slot)
        for module, slots in self._dora_slots.items():
            if slot in slots:
                self._g[module][:, slot].fill_(1.0)
                self._c[module][:, slot].zero_()
                slots.discard(slot)
        self._saved.pop(slot, None)
        self._forget(slot)

    def _dora_stacks(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """DoRA's g and (1 - g) * bias stacks of ``module`` (made at first use)."""
        if module not in self._g:
            shape = (self.num_layers, self.num_slots + 1, self.module_dims[module][1])
            # Plain tensors even when a (compiled) step asks first: install() updates them
            # in place outside inference mode.
            with torch.inference_mode(False):
                self._g[module] = torch.ones(shape, dtype=_COMPUTE_DTYPE, device=self.device)
                self._c[module] = torch.zeros(shape, dtype=_COMPUTE_DTYPE, device=self.device)
        return self._g[module], self._c[module]

    def saved_path(self, module: Any) -> str | None:
        """The path under which an adapter's saved weights replace ``module``."""
        return next((p for p, (m, _) in self.saved_modules.items() if m is module), None)

    @property
    def saves(self) -> bool:
        """True when some installed adapter replaces a whole module."""
        return bool(self._saved)

    def has_saved(self, slot: int) -> bool:
        """True when the adapter in ``slot`` replaces a whole module (modules_to_save)."""
        return slot in self._saved

    def saved_bytes(self) -> int:
        """Bytes of the saved modules of the installed adapters."""
        return sum(t.numel() * t.element_size() for d in self._saved.values() for t in d.values())

    def replace_saved(
        self, path: str, slots: list[int], x: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """``out[i]`` recomputed by the module at ``path`` with the saved weight of the
        adapter in ``slots[i]``, for the rows whose adapter saved that module (``x``: the
        module's input, a row each: token ids for the embeddings, hidden states for the
        head); other rows keep the base module's output."""
        if not self._saved or path not in self.saved_modules:
            return out
        module = self.saved_modules[path][0]
        for slot in sorted(set(slots)):
            weight = self._saved.get(slot, {}).get(path)
            if weight is None:
                continue
            rows = torch.tensor([i for i, s in enumerate(slots) if s == slot], device=x.device)
            if isinstance(module, torch.nn.Linear):  # a packed head ignores its .weight
                y = F.linear(x[rows], weight, module.bias)
            else:  # the module's own forward (Gemma scales its embeddings)
                y = torch.func.functional_call(module, {"weight": weight}, (x[rows],))
            out[rows] = y.to(out.dtype)
        return out

    def _forget(self, slot: int) -> None:
        for key in [k for k in self._cache if slot in k[1]]:
            del self._cache[key]
            self._cache_bytes.pop(key, None)
        self._tok_key = None  # a slot's weights changed: rebuild the per-token rows

    def _adapter_bytes(self) -> int:
        """float32 bytes of one slot's A and B over every layer and module."""
        per_layer = sum(i + o for i, o in self.module_dims.values()) * self.rank
        return per_layer * self.num_layers * 4

    # --- the step ----------------------------------------------------------------------

    def plan(self, row_slots: list[int], row_lengths: list[int]) -> LoraPlan:
        """Which adapters a step uses, and how each token gets its own."""
        active = tuple(sorted({s for s in row_slots if s}))
        if not active:
            return LoraPlan()
        dora = frozenset(m for m, slots in self._dora_slots.items() if slots.intersection(active))
        if len(active) == 1 and all(s == active[0] for s in row_slots):
            return LoraPlan(active=active, dora=dora)
        token_slots = torch.repeat_interleave(torch.tensor(row_slots), torch.tensor(row_lengths))
        tokens = token_slots.to(self.device) if dora else None
        if (
            len(active) >= _PER_TOKEN_MIN_ADAPTERS
            and all(n == 1 for n in row_lengths)
            and len(row_slots) * self._adapter_bytes() <= _PER_TOKEN_BYTES
        ):
            return LoraPlan(active=active, per_token=tuple(row_slots), dora=dora, tokens=tokens)
        lookup = torch.tensor(active)
        onehot = (token_slots.unsqueeze(1) == lookup.unsqueeze(0)).to(_COMPUTE_DTYPE)  # [T, n]
        mask = onehot.repeat_interleave(self.rank, dim=1).to(self.device)  # [T, n*r]
        return LoraPlan(active=active, mask=mask, dora=dora, tokens=tokens)

    def _cached(
        self, key: tuple[str, tuple[int, ...]]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        stacks = self._cache.get(key)
        if stacks is not None:
            self._cache.move_to_end(key)
        return stacks

    def _remember(
        self, key: tuple[str, tuple[int, ...]], stacks: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        size = sum(
            a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in stacks.values()
        )
        while self._cache and sum(self._cache_bytes.values()) + size > _CACHE_BYTES:
            old, _ = self._cache.popitem(last=False)
            self._cache_bytes.pop(old, None)
        self._cache[key] = stacks
        self._cache_bytes[key] = size

    def _stacks(self, active: tuple[int, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        key = ("set", active)
        cached = self._cached(key)
        if cached is not None:
            return cached
        index = torch.tensor(active, device=self.device)
        stacks = {}
        for module, slots in self._module_slots.items():
            if not slots.intersection(active):
                continue
            # [L, n, r, in] -> [L, n*r, in]: no transpose copy (it made a new active set
            # cost ~300 ms on SmolLM2); the matmul reads A through a transposed view.
            a = self._a[module].index_select(1, index).to(_COMPUTE_DTYPE)
            b = self._b[module].index_select(1, index).to(_COMPUTE_DTYPE)  # [L, n, r, out]
            n, r = len(active), self.rank
            stacks[module] = (
                a.reshape(self.num_layers, n * r, -1),
                b.reshape(self.num_layers, n * r, -1),
            )
        self._remember(key, stacks)
        return stacks

    def graph_inputs(
        self, row_slots: list[int], modules: tuple[str, ...], *, hint: int | None = None
    ) -> tuple[
        torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]
    ]:
        """The compiled decode step's adapter inputs: each row's slot, the stacks
        ``A[m] [L, S, r, in]``, ``B[m] [L, S, r, out]`` of each of ``modules`` (the bank's
        own tensors, in the model dtype; before any adapter, zeros of rank 2) and DoRA's
        float32 ``g[m]``, ``(1 - g) * bias[m]`` ``[L, S, out]`` (ones and zeros where no
        adapter is DoRA). ``hint``: stacks with ``hint`` slots and rank 3 (or 5) instead:
        the compile's example, sized so that no other dimension of it shares a size."""
        slots = torch.tensor(row_slots, device=self.device)
        if hint is not None:  # the compile's example: made for it, not kept
            rank = 3 if hint != 3 else 5
            a = [self._zeros(m, hint, rank, 0) for m in modules]
            b = [self._zeros(m, hint, rank, 1) for m in modules]
            c = [
                torch.zeros(self.num_layers, hint, self.module_dims[m][1], device=self.device)
                for m in modules
            ]
            return slots, a, b, [t + 1.0 for t in c], c
        dora = [self._dora_stacks(m) for m in modules]
        g, c = [d[0] for d in dora], [d[1] for d in dora]
        if self.rank:
            return slots, [self._a[m] for m in modules], [self._b[m] for m in modules], g, c
        if self._zero_stacks is None:
            self._zero_stacks = (
                [self._zeros(m, self.num_slots + 1, 2, 0) for m in modules],
                [self._zeros(m, self.num_slots + 1, 2, 1) for m in modules],
            )
        return slots, *self._zero_stacks, g, c

    def _zeros(self, module: str, num_slots: int, rank: int, side: int) -> torch.Tensor:
        return torch.zeros(
            self.num_layers,
            num_slots,
            rank,
            self.module_dims[module][side],
            dtype=self.dtype,
            device=self.device,
        )

    def _token_stacks(
        self, token_slots: tuple[int, ...]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-token stacks ``A [L, T, r, in]``, ``B [L, T, r, out]`` in float32.

        Kept in buffers that live across steps: when the batch changes, only the rows
        whose adapter changed are copied from the bank (a request joining or leaving
        costs one adapter's worth of copying, not the whole batch's).
        """
        if token_slots == self._tok_key:
            return self._tok_views
        T = len(token_slots)
        modules = [m for m, slots in self._module_slots.items() if slots]
        old = self._tok_key or ()
        if self._tok_cap < T or set(modules) != set(self._tok_a):
            self._tok_cap = max(T, self._tok_cap)
            self._tok_a = {
                m: torch.empty(
                    self.num_layers,
                    self._tok_cap,
                    self.rank,
                    self.module_dims[m][0],
                    dtype=_COMPUTE_DTYPE,
                    device=self.device,
                )
                for m in modules
            }
            self._tok_b = {
                m: torch.empty(
                    self.num_layers,
                    self._tok_cap,
                    self.rank,
                    self.module_dims[m][1],
                    dtype=_COMPUTE_DTYPE,
                    device=self.device,
                )
                for m in modules
            }
            old = ()
        for t in range(T):
            if t < len(old) and old[t] == token_slots[t]:
                continue
            slot = token_slots[t]
            for m in modules:  # one pass each: gather and convert to float32 together
                self._tok_a[m][:, t].copy_(self._a[m][:, slot])
                self._tok_b[m][:, t].copy_(self._b[m][:, slot])
        self._tok_key = token_slots
        self._tok_views = {m: (self._tok_a[m][:, :T], self._tok_b[m][:, :T]) for m in modules}
        return self._tok_views

    def apply(
        self, plan: LoraPlan, layer: int, module: str, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Return ``y`` plus every token's adapter delta for ``module`` at ``layer``."""
        if plan.empty:
            return y
        if plan.per_token is not None:
            stacks = self._token_stacks(plan.per_token).get(module)
            if stacks is None:
                return y
            a, b = stacks
            xa = torch.bmm(plan.as_compute(x).unsqueeze(1), a[layer].transpose(1, 2))  # [T, 1, r]
            y.add_(torch.bmm(xa, b[layer]).squeeze(1))
        else:
            stacks = self._stacks(plan.active).get(module)
            if stacks is None:
                return y
            a, b = stacks
            xa = plan.as_compute(x) @ a[layer].T  # [T, n*r]
            if plan.mask is not None:
                xa.mul_(plan.mask)
            y.add_(xa @ b[layer])  # in-place add casts the float32 delta to y's dtype
        if module not in plan.dora:
            return y
        scales = plan._scales.get(module)
        if scales is None:  # every layer's scales of each token, gathered once a step
            g, c = self._g[module], self._c[module]
            index = plan.tokens
            if index is None:
                index = torch.tensor(plan.active[:1], device=self.device)
            scales = plan._scales[module] = (g.index_select(1, index), c.index_select(1, index))
        return y.mul_(scales[0][layer]).add_(scales[1][layer])
