"""Batched LoRA for many adapters in one step (the Punica / S-LoRA / LoRAX idea, on CPU).

Each adapted projection keeps two stacks over adapter slots, ``A[layer, slot, rank,
in]`` and ``B[layer, slot, rank, out]`` (the LoRA scale folded into ``B``); slot 0
is "no adapter" and stays zero. A step computes one :class:`LoraPlan` from the rows'
slots and reuses it in all layers. For the ``n`` distinct adapters in the step, their
``A`` and ``B`` are concatenated along the rank axis, so that each projection costs
two matmuls whatever ``n`` is::

    delta = ((x @ A_active.T) * mask) @ B_active        # [T, n*r] -> [T, out]

where ``mask`` keeps, for every token, only the rank columns of its own adapter
(rows without an adapter get zeros). That is exact: the other adapters' columns are
multiplied by zero before the second matmul. Small bf16 matmuls are slow on CPU, so
the LoRA math runs in float32 (the stacks are stored in the model dtype and
converted when a new set of active adapters is first seen, then cached).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from openllm_clone.errors import AdapterIncompatibleError

if TYPE_CHECKING:
    from openllm_clone.adapters.weights import AdapterWeights

__all__ = ["LoraBank", "LoraPlan"]

_COMPUTE_DTYPE = torch.float32


@dataclass
class LoraPlan:
    """How to apply adapters to the packed tokens of one step."""

    active: tuple[int, ...] = ()
    mask: torch.Tensor | None = None  # [T, n*r]; None when every token has active[0]
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
        # active slots -> module -> (A [L, n*r, in], B [L, n*r, out]) in float32
        self._cache: dict[tuple[int, ...], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

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
            a = torch.zeros(self.num_layers, self.num_slots + 1, rank, in_features,
                            dtype=self.dtype, device=self.device)
            b = torch.zeros(self.num_layers, self.num_slots + 1, rank, out_features,
                            dtype=self.dtype, device=self.device)
            if name in self._a:
                a[:, :, : self.rank].copy_(self._a[name])
                b[:, :, : self.rank].copy_(self._b[name])
            self._a[name], self._b[name] = a, b
        self.rank = rank
        self._cache.clear()

    def install(self, slot: int, weights: AdapterWeights) -> None:
        """Write an adapter into ``slot`` (the caller guarantees no step is running)."""
        if not 1 <= slot <= self.num_slots:
            raise ValueError(f"slot {slot} out of range 1..{self.num_slots}")
        self._grow(weights.rank)
        self.clear(slot)
        for (layer, module), lora in weights.modules.items():
            rank = lora.a.shape[0]
            self._a[module][layer, slot, :rank].copy_(lora.a)
            self._b[module][layer, slot, :rank].copy_((lora.b * lora.scale).T)
            self._module_slots[module].add(slot)
        self._forget(slot)

    def clear(self, slot: int) -> None:
        """Zero ``slot`` so that it adds nothing."""
        for module, slots in self._module_slots.items():
            if slot in slots:
                self._a[module][:, slot].zero_()
                self._b[module][:, slot].zero_()
                slots.discard(slot)
        self._forget(slot)

    def _forget(self, slot: int) -> None:
        for key in [k for k in self._cache if slot in k]:
            del self._cache[key]

    # --- the step ----------------------------------------------------------------------

    def plan(self, row_slots: list[int], row_lengths: list[int]) -> LoraPlan:
        """Which adapters a step uses, and which rank columns each token keeps."""
        active = tuple(sorted({s for s in row_slots if s}))
        if not active:
            return LoraPlan()
        if len(active) == 1 and all(s == active[0] for s in row_slots):
            return LoraPlan(active=active)
        token_slots = torch.repeat_interleave(
            torch.tensor(row_slots), torch.tensor(row_lengths)
        )
        lookup = torch.tensor(active)
        onehot = (token_slots.unsqueeze(1) == lookup.unsqueeze(0)).to(_COMPUTE_DTYPE)  # [T, n]
        mask = onehot.repeat_interleave(self.rank, dim=1).to(self.device)  # [T, n*r]
        return LoraPlan(active=active, mask=mask)

    def _stacks(self, active: tuple[int, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        cached = self._cache.get(active)
        if cached is not None:
            return cached
        if len(self._cache) > 64:
            self._cache.clear()
        index = torch.tensor(active, device=self.device)
        stacks = {}
        for module, slots in self._module_slots.items():
            if not slots.intersection(active):
                continue
            a = self._a[module].index_select(1, index).to(_COMPUTE_DTYPE)  # [L, n, r, in]
            b = self._b[module].index_select(1, index).to(_COMPUTE_DTYPE)  # [L, n, r, out]
            n, r = len(active), self.rank
            stacks[module] = (a.reshape(self.num_layers, n * r, -1).transpose(1, 2).contiguous(),
                              b.reshape(self.num_layers, n * r, -1).contiguous())
        self._cache[active] = stacks
        return stacks

    def apply(
        self, plan: LoraPlan, layer: int, module: str, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Return ``y`` plus every token's adapter delta for ``module`` at ``layer``."""
        if plan.empty:
            return y
        stacks = self._stacks(plan.active).get(module)
        if stacks is None:
            return y
        a, b = stacks
        xa = plan.as_compute(x) @ a[layer]  # [T, n*r]
        if plan.mask is not None:
            xa.mul_(plan.mask)
        return y.add_(xa @ b[layer])  # in-place add casts the float32 delta to y's dtype
