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
  the active lists and a forward hook adds each slot's delta on the rows that use it only
  (``index_select``, the slot's A and B cut to the rank they hold, times the rows' weights,
  ``index_add_``): each row costs the ranks of its own adapters, as in a uniform batch, and a
  base-only row is never touched.
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
class _RowGroup:
    """Dynamic mode, mixed batch: the rows of a component's batch that use one slot, and their
    weights shaped for Linear ([rows, 1, 1]) and Conv2d ([rows, 1, 1, 1]) outputs."""

    rows: torch.Tensor | None  # indices into the batch; None when every row uses the slot
    linear: torch.Tensor
    conv: torch.Tensor


@dataclass(frozen=True)
class _MixedLayer:
    """Dynamic mode, mixed batch: a layer's slots in use, each cut to the rank it holds, with
    the rows that use it. Conv2d layers also keep lora_A's geometry (lora_B is 1x1)."""

    parts: tuple[tuple[torch.Tensor, torch.Tensor, _RowGroup], ...]
    conv: dict[str, Any] | None


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
    mixed: _MixedLayer | None = None


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
                    self._mixed_hook(len(self._layers))
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

        def rows_of(component: str, slot: int) -> torch.Tensor:
            return per_slot[:, slot].repeat(repeats.get(component, 1))

        if self.static_graph:
            self._write_row_scales(lambda c, slot: rows_of(c, slot).to(slot_A.device))
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
            layer.mixed = None
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
        groups: dict[tuple[str, int], _RowGroup | None] = {}
        for index, layer in enumerate(self._layers):
            if layer.active:
                _set_layer_active(layer, ())
            parts: list[tuple[torch.Tensor, torch.Tensor, _RowGroup]] = []
            for slot in layer_slots.get(index, []):
                rank = layer.filled_rank[slot]
                key = (layer.component, slot)
                if key not in groups:
                    groups[key] = self._row_group(rows_of(*key))
                group = groups[key]
                if rank and group is not None:
                    parts.append((layer.lora_A[slot][:rank], layer.lora_B[slot][:, :rank], group))
            layer.mixed = (
                _MixedLayer(tuple(parts), self._conv_args(layer) if layer.conv else None)
                if parts
                else None
            )

    def _row_group(self, weights: torch.Tensor) -> _RowGroup | None:
        """The rows with a non-zero weight (None when there are none), on the slots' device."""
        used = weights.nonzero().squeeze(1)
        if not len(used):
            return None
        device = self._layers[0].lora_A[0].device
        rows = None if len(used) == len(weights) else used.to(device)
        values = weights[used].to(device)
        return _RowGroup(rows=rows, linear=values.view(-1, 1, 1), conv=values.view(-1, 1, 1, 1))

    def _conv_args(self, layer: _SlotLayer) -> dict[str, Any]:
        """A Conv2d layer's lora_A geometry (the base layer's), for the stacked delta."""
        lora_A = cast(torch.nn.Module, layer.module).get_submodule(f"lora_A.{self.slot_names[0]}")
        assert isinstance(lora_A, torch.nn.Conv2d)
        return {"stride": lora_A.stride, "padding": lora_A.padding, "dilation": lora_A.dilation}

    def _mixed_hook(self, index: int) -> Callable[..., torch.Tensor | None]:
        """The forward hook that adds a mixed batch's LoRA deltas to a layer's base output, each
        slot's on the rows that use it."""

        def hook(
            _module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> torch.Tensor | None:
            mixed = self._layers[index].mixed
            if mixed is None:
                return None
            x = args[0]
            for lora_A, lora_B, group in mixed.parts:
                sub = (x if group.rows is None else x.index_select(0, group.rows)).to(lora_A.dtype)
                if mixed.conv is not None:
                    hidden = torch.nn.functional.conv2d(sub, lora_A, **mixed.conv)
                    delta = torch.nn.functional.conv2d(hidden, lora_B) * group.conv
                else:
                    hidden = torch.nn.functional.linear(sub, lora_A)
                    delta = torch.nn.functional.linear(hidden, lora_B) * group.linear
                # The base output is this call's own tensor: add in place.
                if group.rows is None:
                    output += delta.to(output.dtype)
                else:
                    output.index_add_(0, group.rows, delta.to(output.dtype))
            return output

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
