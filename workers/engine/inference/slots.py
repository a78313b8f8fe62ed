"""A fixed pool of LoRA slots injected once into the base model, and in-place adapter switching.

``LoraSlotPool`` injects ``max_active`` peft LoRA adapters named ``slot0``..``slotN-1`` (rank
``max_rank``) into every supported module of the UNet and the text encoder, once. Resident
adapters are plain tensors on the device, outside the model (``ResidentAdapter``). Switching the
active set copies the requested adapters' A/B into slots in place (rank zero-padded), sets each
slot's scale to the weight (alpha / rank is folded into B) and takes unused slots out of the
forward pass. The cost depends on the pool and on the adapters being switched in, never on how
many adapters are resident, unlike diffusers' ``set_adapters`` which walks every loaded adapter.

Mixed batches (``activate_rows``): every image (row) of one pipeline call may use its own
adapters and weights. The union of the batch's adapters sits in slots, and each row gets a
weight per slot, 0 for a slot it does not use. Each module's ``alpha / rank`` is folded into
its copy of B when the adapter is made resident, so a layer's scale is the weight alone and one
row vector per slot serves every layer. The UNet sees each row ``repeats`` times
(classifier-free guidance stacks the negative rows before the positive ones), the text encoder
once per prompt list. How the rows' weights reach the layers depends on the mode (below).

Two modes:

* dynamic (default): each LoRA layer's active-adapter list holds only the slots whose adapter
  targets that layer, so an idle slot costs nothing and with no adapters every layer runs
  exactly its base module (bitwise equal to the pristine model). A mixed batch instead empties
  the active lists and a forward hook adds the layer's delta from its slots stacked along the
  rank (each cut to the rank it holds): ``((x @ A_stack.T) * row_weights) @ B_stack.T``, where
  ``row_weights`` repeats each row's slot weight over that slot's ranks. That is two products
  and a multiply per layer whatever the number of adapters mixed, and costs the sum of the
  adapters' ranks, not the padded rank of every slot.
* ``static_graph=True``: every slot stays active in every layer, in a fixed order, and each
  slot's scale is its row-weight tensor (``[rows, 1, 1]`` for Linear inputs, ``[rows, 1, 1,
  1]`` for Conv2d), updated in place, which peft's forward broadcasts over the layer's output;
  a layer an adapter does not target gets zeroed weights.
  Nothing the forward pass reads changes identity or shape while the batch size stays, so a
  ``torch.compile``'d model does not recompile on a switch nor on a new mix of adapters (the
  approach of peft's ``prepare_model_for_compiled_hotswap``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from workers.engine.inference.lora_file import AdapterFormatError, LoraAdapterWeights

# The modules the pool covers. Attention projections are what the diffusers LoRA recipe
# trains; the transformer-block feed-forward and projections cover most imported adapters.
UNET_TARGET_MODULES: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
)
TEXT_ENCODER_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "fc1",
    "fc2",
)
DEFAULT_TARGET_MODULES: Mapping[str, tuple[str, ...]] = {
    "unet": UNET_TARGET_MODULES,
    "text_encoder": TEXT_ENCODER_TARGET_MODULES,
}


@dataclass(frozen=True)
class ResidentModule:
    """One module of a resident adapter, bound to a layer of the pool."""

    layer_index: int
    lora_A: torch.Tensor
    # B times the module's alpha / rank (``scaling``, kept for reference).
    lora_B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]


@dataclass(frozen=True, eq=False)
class ResidentAdapter:
    """An adapter's tensors on the device, ready to be copied into a slot."""

    key: str
    modules: tuple[ResidentModule, ...]
    nbytes: int


@dataclass
class _RowScales:
    """One slot's weight for each row of a component's batch, and the views layers read."""

    rows: torch.Tensor
    linear: torch.Tensor  # [rows, 1, 1]: Linear inputs are [batch, tokens, channels]
    conv: torch.Tensor  # [rows, 1, 1, 1]: Conv2d inputs are [batch, channels, height, width]

    @classmethod
    def of(cls, rows: torch.Tensor) -> _RowScales:
        return cls(rows=rows, linear=rows.view(-1, 1, 1), conv=rows.view(-1, 1, 1, 1))


@dataclass(frozen=True)
class _StackedLora:
    """Dynamic mode, mixed batch: the layer's slots in use, stacked along the rank (each cut to
    the rank it holds), with one weight per row and rank. The layer's delta is then two
    products and a multiply, however many adapters the batch mixes."""

    lora_A: torch.Tensor  # [sum of ranks, in] (Conv2d: [sum of ranks, in, kh, kw])
    lora_B: torch.Tensor  # [out, sum of ranks] (Conv2d: [out, sum of ranks, 1, 1])
    scales: torch.Tensor  # [rows, 1, sum of ranks] (Conv2d: [rows, sum of ranks, 1, 1])
    # Conv2d only: lora_A's stride and padding (the base layer's); lora_B is 1x1.
    conv: dict[str, Any] | None = None


@dataclass
class _SlotLayer:
    component: str
    name: str
    module: LoraLayer
    conv: bool
    lora_A: list[torch.Tensor]
    lora_B: list[torch.Tensor]
    # How many leading rank rows of each slot hold data (the rest is zero already).
    filled_rank: list[int]
    # The scale each slot has now, mirrored in Python so a switch never reads the device.
    scales: list[float]
    active: tuple[str, ...]
    stacked: _StackedLora | None = None


class LoraSlotPool:
    """``max_active`` LoRA slots of rank ``max_rank`` injected into the given model components."""

    def __init__(
        self,
        components: Mapping[str, torch.nn.Module],
        *,
        max_active: int = 4,
        max_rank: int = 64,
        target_modules: Mapping[str, Sequence[str]] = DEFAULT_TARGET_MODULES,
        static_graph: bool = False,
    ) -> None:
        if max_active < 1 or max_rank < 1:
            raise ValueError("max_active and max_rank must be at least 1")
        self.max_active = max_active
        self.max_rank = max_rank
        self.static_graph = static_graph
        self.slot_names = tuple(f"slot{i}" for i in range(max_active))
        self._layers: list[_SlotLayer] = []
        self._index: dict[tuple[str, str], int] = {}
        self._holders: list[ResidentAdapter | None] = [None] * max_active
        # Layers where each slot holds non-zero data (kept after the holder is released).
        self._slot_layers: list[frozenset[int]] = [frozenset()] * max_active
        self._active: tuple[tuple[str, float], ...] = ()
        # Static mode: each (component, slot)'s row weights, shared by the component's layers.
        self._row_scales: dict[tuple[str, int], _RowScales] = {}
        for component, model in components.items():
            targets = list(target_modules.get(component, ()))
            if targets:
                self._inject(component, model, targets)
        if not self._layers:
            raise ValueError("no module of the given components matches the target modules")

    def _inject(self, component: str, model: torch.nn.Module, targets: list[str]) -> None:
        config = LoraConfig(
            r=self.max_rank, lora_alpha=self.max_rank, lora_dropout=0.0, target_modules=targets
        )
        with warnings.catch_warnings():
            # peft warns that a model gets several adapters: several slots are the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for slot in self.slot_names:
                inject_adapter_in_model(config, model, adapter_name=slot)
        model.requires_grad_(False)
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            lora_A: list[torch.Tensor] = [_weight(module.lora_A[s]) for s in self.slot_names]
            lora_B: list[torch.Tensor] = [_weight(module.lora_B[s]) for s in self.slot_names]
            with torch.no_grad():
                for weight in (*lora_A, *lora_B):
                    weight.zero_()
            scales = [0.0] * self.max_active
            conv = isinstance(module.get_base_layer(), torch.nn.Conv2d)
            if self.static_graph:
                for slot_index, slot in enumerate(self.slot_names):
                    row_scales = self._row_scales.get((component, slot_index))
                    if row_scales is None:
                        rows = torch.zeros(1, device=lora_A[0].device, dtype=lora_A[0].dtype)
                        row_scales = self._row_scales[(component, slot_index)] = _RowScales.of(rows)
                    module.scaling[slot] = row_scales.conv if conv else row_scales.linear
                active = self.slot_names
            else:
                for slot in self.slot_names:
                    module.scaling[slot] = 0.0
                active = ()
            module.set_adapter(list(active), inference_mode=True)
            if not hasattr(module, "_active_adapter"):
                raise RuntimeError("this peft version keeps a layer's active adapters elsewhere")
            self._index[(component, name)] = len(self._layers)
            if not self.static_graph:
                cast(torch.nn.Module, module).register_forward_hook(
                    self._stacked_hook(len(self._layers))
                )
            self._layers.append(
                _SlotLayer(
                    component=component,
                    name=name,
                    module=module,
                    conv=conv,
                    lora_A=lora_A,
                    lora_B=lora_B,
                    filled_rank=[0] * self.max_active,
                    scales=scales,
                    active=tuple(active),
                )
            )

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        """The active adapters as (key, weight), in the order they were requested."""
        return self._active

    def _layer_index(self, component: str, module_name: str) -> int | None:
        index = self._index.get((component, module_name))
        if index is None and component == "text_encoder":
            # transformers 5 flattened CLIPTextModel; older files still say "text_model.".
            alias = (
                module_name.removeprefix("text_model.")
                if module_name.startswith("text_model.")
                else f"text_model.{module_name}"
            )
            index = self._index.get((component, alias))
        return index

    def make_resident(self, key: str, weights: LoraAdapterWeights) -> ResidentAdapter:
        """Check ``weights`` against the pool and copy them to the slots' device and dtype."""
        modules: list[ResidentModule] = []
        nbytes = 0
        for (component, name), module_weights in sorted(weights.modules.items()):
            index = self._layer_index(component, name)
            if index is None:
                raise AdapterFormatError(
                    f"adapter {key!r} targets {component}.{name}, which the slot pool does not "
                    "cover; add it to the engine's target modules"
                )
            layer = self._layers[index]
            slot_A, slot_B = layer.lora_A[0], layer.lora_B[0]
            lora_A, lora_B = module_weights.lora_A, module_weights.lora_B
            rank = lora_A.shape[0]
            if rank > self.max_rank:
                raise AdapterFormatError(
                    f"adapter {key!r} has rank {rank} at {component}.{name}; "
                    f"the engine's max_rank is {self.max_rank}"
                )
            if (
                lora_A.shape[1:] != slot_A.shape[1:]
                or lora_B.shape[0] != slot_B.shape[0]
                or lora_B.shape[2:] != slot_B.shape[2:]
            ):
                raise AdapterFormatError(
                    f"adapter {key!r} does not fit {component}.{name}: "
                    f"A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)} for a layer with "
                    f"A {tuple(slot_A.shape)}, B {tuple(slot_B.shape)}"
                )
            device_A = lora_A.to(device=slot_A.device, dtype=slot_A.dtype).contiguous()
            # alpha / rank folded into B: a layer's scale is then the weight alone, so one row
            # tensor per slot serves every layer in mixed batches.
            scaled_B = lora_B * module_weights.scaling if module_weights.scaling != 1 else lora_B
            device_B = scaled_B.to(device=slot_B.device, dtype=slot_B.dtype).contiguous()
            nbytes += device_A.numel() * device_A.element_size()
            nbytes += device_B.numel() * device_B.element_size()
            modules.append(
                ResidentModule(
                    layer_index=index,
                    lora_A=device_A,
                    lora_B=device_B,
                    scaling=module_weights.scaling,
                )
            )
        return ResidentAdapter(key=key, modules=tuple(modules), nbytes=nbytes)

    @torch.no_grad()
    def _fill_slot(self, slot: int, adapter: ResidentAdapter) -> None:
        targeted = frozenset(m.layer_index for m in adapter.modules)
        # Clear what the previous occupant left in layers the new one does not target, so those
        # layers add exactly zero even in static mode.
        for index in self._slot_layers[slot] - targeted:
            self._zero_slot_layer(self._layers[index], slot)
        for module in adapter.modules:
            layer = self._layers[module.layer_index]
            rank = module.rank
            layer.lora_A[slot][:rank].copy_(module.lora_A)
            layer.lora_B[slot][:, :rank].copy_(module.lora_B)
            filled = layer.filled_rank[slot]
            if filled > rank:
                layer.lora_A[slot][rank:filled].zero_()
                layer.lora_B[slot][:, rank:filled].zero_()
            layer.filled_rank[slot] = rank
        self._holders[slot] = adapter
        self._slot_layers[slot] = targeted

    @staticmethod
    def _zero_slot_layer(layer: _SlotLayer, slot: int) -> None:
        filled = layer.filled_rank[slot]
        if filled:
            layer.lora_A[slot][:filled].zero_()
            layer.lora_B[slot][:, :filled].zero_()
            layer.filled_rank[slot] = 0

    def activate(self, adapters: Sequence[tuple[ResidentAdapter, float]]) -> None:
        """Make exactly ``adapters`` (resident adapter, weight) active for every row; an empty
        list means none."""
        assignment = self._assign([adapter for adapter, _ in adapters])
        if self.static_graph:
            # One row, which broadcasts over any batch (the engine writes per-row weights).
            weights = torch.zeros(self.max_active, dtype=self._layers[0].lora_A[0].dtype)
            for slot, (_, weight) in zip(assignment, adapters, strict=True):
                weights[slot] = weight
            weights = weights.to(self._layers[0].lora_A[0].device)
            self._write_row_scales(lambda _component, slot: weights[slot : slot + 1])
        else:
            layer_slots: dict[int, list[tuple[int, float]]] = {}
            for slot, (adapter, weight) in zip(assignment, adapters, strict=True):
                for module in adapter.modules:
                    layer_slots.setdefault(module.layer_index, []).append((slot, weight))
            self._apply_dynamic(layer_slots)
        self._active = tuple((adapter.key, float(weight)) for adapter, weight in adapters)

    def activate_rows(
        self,
        adapters: Sequence[ResidentAdapter],
        weights: Sequence[Sequence[float]],
        *,
        repeats: Mapping[str, int],
    ) -> None:
        """A mixed batch: row ``i`` uses ``adapters[j]`` at ``weights[i][j]`` (0: not at all).

        ``repeats[component]`` is how many times the component sees the rows stacked (the UNet
        twice under classifier-free guidance); components not named see them once.
        """
        if any(len(row) != len(adapters) for row in weights):
            raise ValueError("every row needs one weight per adapter")
        assignment = self._assign(adapters)
        slot_A = self._layers[0].lora_A[0]
        columns = torch.tensor(weights, dtype=slot_A.dtype).reshape(len(weights), len(adapters))
        per_slot = torch.zeros(len(weights), self.max_active, dtype=slot_A.dtype)
        per_slot[:, assignment] = columns
        per_slot = per_slot.to(slot_A.device)

        def rows_of(component: str, slot: int) -> torch.Tensor:
            return per_slot[:, slot].repeat(repeats.get(component, 1))

        if self.static_graph:
            self._write_row_scales(rows_of)
        else:
            self._apply_rows_dynamic(adapters, assignment, rows_of)
        self._active = tuple(
            (adapter.key, float(next((row[j] for row in weights if row[j]), 0.0)))
            for j, adapter in enumerate(adapters)
        )

    def _assign(self, adapters: Sequence[ResidentAdapter]) -> list[int]:
        """The slot of each adapter: where it already sits, else filled into a free slot."""
        if len(adapters) > self.max_active:
            raise ValueError(
                f"{len(adapters)} adapters requested; the engine has {self.max_active} slots"
            )
        keys = [adapter.key for adapter in adapters]
        if len(set(keys)) != len(keys):
            raise ValueError(f"an adapter is requested twice: {keys}")
        assignment: list[int | None] = []
        taken: set[int] = set()
        for adapter in adapters:
            slot = next(
                (s for s, held in enumerate(self._holders) if held is adapter and s not in taken),
                None,
            )
            assignment.append(slot)
            if slot is not None:
                taken.add(slot)
        free = [s for s in range(self.max_active) if s not in taken]
        # Prefer empty slots, so that adapters used recently stay in place for a later switch.
        free.sort(key=lambda s: self._holders[s] is not None)
        filled: list[int] = []
        for adapter, slot in zip(adapters, assignment, strict=True):
            if slot is None:
                slot = free.pop(0)
                self._fill_slot(slot, adapter)
            filled.append(slot)
        return filled

    def _apply_dynamic(self, layer_slots: Mapping[int, list[tuple[int, float]]]) -> None:
        for index, layer in enumerate(self._layers):
            layer.stacked = None
            wanted = layer_slots.get(index, [])
            for slot, scale in wanted:
                layer.module.scaling[self.slot_names[slot]] = scale
                layer.scales[slot] = scale
            active = tuple(self.slot_names[slot] for slot, _ in wanted)
            if active != layer.active:
                # The forward pass adds the slots in this order (the order of the request).
                _set_layer_active(layer, active)

    @torch.no_grad()
    def _apply_rows_dynamic(
        self,
        adapters: Sequence[ResidentAdapter],
        assignment: Sequence[int],
        rows_of: Callable[[str, int], torch.Tensor],
    ) -> None:
        layer_slots: dict[int, list[int]] = {}
        for slot, adapter in zip(assignment, adapters, strict=True):
            for module in adapter.modules:
                layer_slots.setdefault(module.layer_index, []).append(slot)
        scales: dict[tuple[str, tuple[tuple[int, int], ...]], torch.Tensor] = {}
        for index, layer in enumerate(self._layers):
            if layer.active:
                _set_layer_active(layer, ())
            ranked = tuple(
                (slot, layer.filled_rank[slot])
                for slot in layer_slots.get(index, [])
                if layer.filled_rank[slot]
            )
            if not ranked:
                layer.stacked = None
                continue
            key = (layer.component, ranked)
            if key not in scales:
                columns = [
                    rows_of(layer.component, slot)[:, None].expand(-1, rank)
                    for slot, rank in ranked
                ]
                scales[key] = torch.cat(columns, dim=1)
            row_scales = scales[key]
            layer.stacked = _StackedLora(
                lora_A=torch.cat([layer.lora_A[slot][:rank] for slot, rank in ranked]),
                lora_B=torch.cat([layer.lora_B[slot][:, :rank] for slot, rank in ranked], dim=1),
                scales=row_scales[:, :, None, None] if layer.conv else row_scales[:, None, :],
                conv=self._conv_args(layer) if layer.conv else None,
            )

    def _conv_args(self, layer: _SlotLayer) -> dict[str, Any]:
        """A Conv2d layer's lora_A geometry (the base layer's), for the stacked delta."""
        lora_A = cast(torch.nn.Module, layer.module).get_submodule(f"lora_A.{self.slot_names[0]}")
        assert isinstance(lora_A, torch.nn.Conv2d)
        return {"stride": lora_A.stride, "padding": lora_A.padding, "dilation": lora_A.dilation}

    def _stacked_hook(self, index: int) -> Callable[..., torch.Tensor | None]:
        """The forward hook that adds a mixed batch's LoRA delta to a layer's base output."""

        def hook(
            module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> torch.Tensor | None:
            stacked = self._layers[index].stacked
            if stacked is None:
                return None
            x = args[0].to(stacked.lora_A.dtype)
            if stacked.conv is not None:
                hidden = torch.nn.functional.conv2d(x, stacked.lora_A, **stacked.conv)
                delta = torch.nn.functional.conv2d(hidden * stacked.scales, stacked.lora_B)
            else:
                hidden = torch.nn.functional.linear(x, stacked.lora_A)
                delta = torch.nn.functional.linear(hidden * stacked.scales, stacked.lora_B)
            return output + delta.to(output.dtype)

        return hook

    @torch.no_grad()
    def _write_row_scales(self, rows_of: Callable[[str, int], torch.Tensor]) -> None:
        """Static mode: write each slot's row weights in place; only a new batch size gives the
        tensors a new shape (and the layers new views), which a compiled model sees anyway."""
        for (component, slot), row_scales in list(self._row_scales.items()):
            rows = rows_of(component, slot)
            if rows.shape == row_scales.rows.shape:
                row_scales.rows.copy_(rows)
                continue
            resized = self._row_scales[(component, slot)] = _RowScales.of(rows.clone())
            for layer in self._layers:
                if layer.component == component:
                    view = resized.conv if layer.conv else resized.linear
                    layer.module.scaling[self.slot_names[slot]] = view

    def release(self, adapter: ResidentAdapter) -> None:
        """Drop the pool's reference to ``adapter`` (evicted from the device tier).

        Slots hold copies, so an active adapter keeps working; it is copied in again the next
        time it is requested.
        """
        for slot, held in enumerate(self._holders):
            if held is adapter:
                self._holders[slot] = None


def _weight(lora_module: torch.nn.Module) -> torch.Tensor:
    weight = lora_module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _set_layer_active(layer: _SlotLayer, active: tuple[str, ...]) -> None:
    """Replace one LoRA layer's active-adapter list.

    peft's ``set_adapter`` does the same and also walks every slot's parameters to set
    ``requires_grad``; the slots are frozen once at injection, so the switch skips that walk
    (about 20 calls per layer on each switch).
    """
    layer.module._active_adapter = list(active)
    layer.active = active
