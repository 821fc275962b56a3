"""Batched LoRA for many adapters in one step (Punica / S-LoRA / LoRAX style).

Each adapted projection keeps two stacked tensors over adapter slots,
``A[layer, slot, rank, in]`` and ``B[layer, slot, out, rank]`` (the LoRA scale is
folded into ``B``); slot 0 is "no adapter" and stays zero. A step computes one
:class:`LoraPlan` from the rows' slots and reuses it in every layer:

- no row has an adapter: nothing is computed (the base model's cost exactly);
- few distinct adapters, or prompt chunks: one pair of matmuls per adapter over its
  rows' tokens (segments);
- many distinct adapters on single-token (decode) rows: one gathered ``bmm`` pair
  for all rows (BGMV), so the cost does not grow with the number of adapters.

A rank lower than the stack's is zero-padded, which adds exact zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from openllm_clone.errors import AdapterIncompatibleError

if TYPE_CHECKING:
    from openllm_clone.adapters.weights import AdapterWeights

__all__ = ["LoraBank", "LoraPlan"]

# Above this many distinct adapters in a decode step, gather-bmm beats segments.
_GATHER_MIN_ADAPTERS = 3


@dataclass
class LoraPlan:
    """How to apply adapters to the packed tokens of one step."""

    kind: str  # "none" | "segments" | "gather"
    # segments: (slot, token index or slice)
    segments: list[tuple[int, torch.Tensor | slice]] = field(default_factory=list)
    # gather: token indices with an adapter and their slots
    token_index: torch.Tensor | None = None
    token_slots: torch.Tensor | None = None
    slots: frozenset[int] = frozenset()


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
    ) -> None:
        self.module_dims = module_dims
        self.num_layers = num_layers
        self.num_slots = num_slots  # usable slots; index 0 is reserved for "none"
        self.dtype = dtype
        self.device = device
        self.rank = 0
        self._a: dict[str, torch.Tensor] = {}
        self._b: dict[str, torch.Tensor] = {}
        self._module_slots: dict[str, set[int]] = {name: set() for name in module_dims}

    # --- validation and installation -------------------------------------------------

    def validate(self, weights: AdapterWeights, *, max_rank: int) -> None:
        """Raise AdapterIncompatibleError unless ``weights`` fit this model."""
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
            in_features, out_features = self.module_dims[module]
            if lora.a.shape[1] != in_features or lora.b.shape[0] != out_features:
                raise AdapterIncompatibleError(
                    f"layer {layer} {module}: adapter shapes A{tuple(lora.a.shape)} "
                    f"B{tuple(lora.b.shape)} do not fit the base model's "
                    f"{in_features} -> {out_features} projection"
                )

    def _grow(self, rank: int) -> None:
        """Make room for ``rank``; existing slots are copied, zero-padded."""
        if rank <= self.rank:
            return
        for name, (in_features, out_features) in self.module_dims.items():
            a = torch.zeros(
                self.num_layers, self.num_slots + 1, rank, in_features,
                dtype=self.dtype, device=self.device,
            )
            b = torch.zeros(
                self.num_layers, self.num_slots + 1, out_features, rank,
                dtype=self.dtype, device=self.device,
            )
            if name in self._a:
                a[:, :, : self.rank].copy_(self._a[name])
                b[:, :, :, : self.rank].copy_(self._b[name])
            self._a[name], self._b[name] = a, b
        self.rank = rank

    def install(self, slot: int, weights: AdapterWeights) -> None:
        """Write an adapter into ``slot`` (the caller guarantees no step is running)."""
        if not 1 <= slot <= self.num_slots:
            raise ValueError(f"slot {slot} out of range 1..{self.num_slots}")
        self._grow(weights.rank)
        self.clear(slot)
        for (layer, module), lora in weights.modules.items():
            rank = lora.a.shape[0]
            self._a[module][layer, slot, :rank].copy_(lora.a)
            self._b[module][layer, slot, :, :rank].copy_(lora.b * lora.scale)
            self._module_slots[module].add(slot)

    def clear(self, slot: int) -> None:
        """Zero ``slot`` so that it adds nothing."""
        for module, slots in self._module_slots.items():
            if slot in slots:
                self._a[module][:, slot].zero_()
                self._b[module][:, slot].zero_()
                slots.discard(slot)

    # --- the step ----------------------------------------------------------------------

    def plan(self, row_slots: list[int], row_lengths: list[int]) -> LoraPlan:
        """Group the packed tokens of a step by adapter slot."""
        slots = frozenset(s for s in row_slots if s)
        if not slots:
            return LoraPlan(kind="none")
        decode_only = all(n == 1 for n in row_lengths)
        if decode_only and len(slots) >= _GATHER_MIN_ADAPTERS:
            index = [i for i, s in enumerate(row_slots) if s]
            return LoraPlan(
                kind="gather",
                token_index=torch.tensor(index, device=self.device),
                token_slots=torch.tensor([row_slots[i] for i in index], device=self.device),
                slots=slots,
            )
        total = sum(row_lengths)
        by_slot: dict[int, list[int]] = {}
        offset = 0
        for slot, n in zip(row_slots, row_lengths):
            if slot:
                by_slot.setdefault(slot, []).extend(range(offset, offset + n))
            offset += n
        segments: list[tuple[int, torch.Tensor | slice]] = []
        for slot, tokens in by_slot.items():
            if len(tokens) == total:
                segments.append((slot, slice(0, total)))
            elif tokens[-1] - tokens[0] + 1 == len(tokens):
                segments.append((slot, slice(tokens[0], tokens[-1] + 1)))
            else:
                segments.append((slot, torch.tensor(tokens, device=self.device)))
        return LoraPlan(kind="segments", segments=segments, slots=slots)

    def apply(
        self, plan: LoraPlan, layer: int, module: str, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Return ``y`` plus every row's adapter delta for ``module`` at ``layer``."""
        if plan.kind == "none" or not (plan.slots & self._module_slots[module]):
            return y
        a_all = self._a[module][layer]  # [S+1, r, in]
        b_all = self._b[module][layer]  # [S+1, out, r]
        x = x.to(a_all.dtype)
        if plan.kind == "gather":
            assert plan.token_index is not None and plan.token_slots is not None
            xs = x.index_select(0, plan.token_index)
            a = a_all.index_select(0, plan.token_slots)  # [n, r, in]
            b = b_all.index_select(0, plan.token_slots)  # [n, out, r]
            delta = torch.bmm(b, torch.bmm(a, xs.unsqueeze(-1))).squeeze(-1)
            return y.index_add(0, plan.token_index, delta.to(y.dtype))
        y = y.clone() if y.requires_grad else y
        for slot, where in plan.segments:
            if slot not in self._module_slots[module]:
                continue
            xs = x[where]
            delta = (xs @ a_all[slot].T) @ b_all[slot].T
            if isinstance(where, slice):
                y[where] += delta.to(y.dtype)
            else:
                y.index_add_(0, where, delta.to(y.dtype))
        return y
