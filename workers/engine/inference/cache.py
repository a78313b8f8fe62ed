"""``AdapterCache``: adapters in three tiers, each an LRU with limits, with pinning.

fetch (artifact store -> a local file, through the caller's ``fetch(key) -> Path``) -> load (a
state dict in CPU memory) -> activate (resident on the device, ready for a slot) -> evict.
Each step is idempotent: asking for what a tier already holds only refreshes its LRU position.
A tier evicts its least recently used entries when it goes over its limit, never a pinned key
nor a key the current call needs. The tiers are independent: an adapter can be resident on the
device after its CPU copy was evicted, and is loaded again from disk only when needed.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Literal, TypedDict, TypeVar

from workers.engine.inference.lora_file import LoraAdapterWeights, load_lora_file
from workers.engine.inference.slots import ResidentAdapter

logger = logging.getLogger(__name__)

FetchAdapter = Callable[[str], Path]
# Where an adapter comes from: a local file, a fetch callable, or None for the cache's own fetch.
AdapterSource = Path | FetchAdapter | None
Tier = Literal["disk", "cpu", "device"]
TIERS: tuple[Tier, ...] = ("disk", "cpu", "device")

_Value = TypeVar("_Value")


class SnapshotEntry(TypedDict):
    key: str
    bytes: int
    pinned: bool


class TierSnapshot(TypedDict):
    entries: list[SnapshotEntry]
    bytes: int
    count: int
    limit_bytes: int | None
    limit_count: int | None


class CacheSnapshot(TypedDict):
    disk: TierSnapshot
    cpu: TierSnapshot
    device: TierSnapshot


@dataclass
class _Entry(Generic[_Value]):
    value: _Value
    nbytes: int


@dataclass
class _DiskFile:
    path: Path
    owned: bool


class _LruTier(Generic[_Value]):
    """An ordered map, oldest first, with byte and count limits."""

    def __init__(self, *, limit_bytes: int | None, limit_count: int | None) -> None:
        self.entries: OrderedDict[str, _Entry[_Value]] = OrderedDict()
        self.limit_bytes = limit_bytes
        self.limit_count = limit_count

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries.values())

    def get(self, key: str) -> _Value | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.entries.move_to_end(key)
        return entry.value

    def over_limit(self) -> bool:
        if self.limit_count is not None and len(self.entries) > self.limit_count:
            return True
        return self.limit_bytes is not None and self.nbytes > self.limit_bytes

    def victims(self, keep: set[str]) -> list[str]:
        """Oldest-first keys to drop until the tier fits its limits (sparing ``keep``)."""
        count, nbytes = len(self.entries), self.nbytes
        chosen: list[str] = []
        for key, entry in self.entries.items():
            fits_count = self.limit_count is None or count <= self.limit_count
            fits_bytes = self.limit_bytes is None or nbytes <= self.limit_bytes
            if fits_count and fits_bytes:
                break
            if key in keep:
                continue
            chosen.append(key)
            count -= 1
            nbytes -= entry.nbytes
        return chosen

    def snapshot(self, pinned: set[str]) -> TierSnapshot:
        entries = [
            SnapshotEntry(key=key, bytes=entry.nbytes, pinned=key in pinned)
            for key, entry in self.entries.items()
        ]
        return TierSnapshot(
            entries=entries,
            bytes=sum(e["bytes"] for e in entries),
            count=len(entries),
            limit_bytes=self.limit_bytes,
            limit_count=self.limit_count,
        )


class AdapterCache:
    """LRU tiers of adapters: local files, CPU state dicts and device-resident tensors."""

    def __init__(
        self,
        *,
        make_resident: Callable[[str, LoraAdapterWeights], ResidentAdapter],
        fetch: FetchAdapter | None = None,
        load: Callable[[Path], LoraAdapterWeights] = load_lora_file,
        on_device_evict: Callable[[ResidentAdapter], None] | None = None,
        disk_limit_bytes: int | None = None,
        cpu_limit_bytes: int | None = 2 * 1024**3,
        device_limit_count: int | None = 64,
        device_limit_bytes: int | None = None,
        delete_evicted_files: bool = False,
    ) -> None:
        """``delete_evicted_files`` removes files that ``fetch`` produced when they leave the disk
        tier (never files handed in as paths)."""
        self._make_resident = make_resident
        self._fetch = fetch
        self._load = load
        self._on_device_evict = on_device_evict
        self._delete_evicted_files = delete_evicted_files
        self._disk: _LruTier[_DiskFile] = _LruTier(limit_bytes=disk_limit_bytes, limit_count=None)
        self._cpu: _LruTier[LoraAdapterWeights] = _LruTier(
            limit_bytes=cpu_limit_bytes, limit_count=None
        )
        self._device: _LruTier[ResidentAdapter] = _LruTier(
            limit_bytes=device_limit_bytes, limit_count=device_limit_count
        )
        self._pinned: set[str] = set()
        self._lock = threading.RLock()

    # -- pinning -----------------------------------------------------------------------------

    def pin(self, key: str) -> None:
        """Never evict ``key`` from any tier until ``unpin`` (idempotent)."""
        with self._lock:
            self._pinned.add(key)

    def unpin(self, key: str) -> None:
        """Let ``key`` be evicted again (idempotent); over-limit tiers shrink now."""
        with self._lock:
            self._pinned.discard(key)
            self._enforce_limits(keep=set())

    @property
    def pinned(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._pinned)

    # -- the steps ---------------------------------------------------------------------------

    def fetch(self, key: str, source: AdapterSource = None) -> Path:
        """Step 1: a local file for ``key`` (fetched once, then served from the disk tier)."""
        with self._lock:
            return self._fetch_locked(key, source, keep={key})

    def load(self, key: str, source: AdapterSource = None) -> LoraAdapterWeights:
        """Step 2: the adapter's state dict in CPU memory."""
        with self._lock:
            return self._load_locked(key, source, keep={key})

    def activate(self, key: str, source: AdapterSource = None) -> ResidentAdapter:
        """Step 3: the adapter resident on the device, ready to be switched into a slot."""
        return self.activate_many([(key, source)])[0]

    def activate_many(self, wanted: Sequence[tuple[str, AdapterSource]]) -> list[ResidentAdapter]:
        """Step 3 for several adapters at once; none of them evicts another."""
        keep = {key for key, _ in wanted}
        with self._lock:
            return [self._activate_locked(key, source, keep=keep) for key, source in wanted]

    def evict(self, key: str, tiers: Iterable[Tier] = TIERS) -> None:
        """Step 4: drop ``key`` from ``tiers`` (idempotent). Pinned keys raise ``ValueError``."""
        with self._lock:
            if key in self._pinned:
                raise ValueError(f"adapter {key!r} is pinned")
            for tier in tiers:
                self._drop(tier, key)

    def snapshot(self) -> CacheSnapshot:
        """What each tier holds (keys, bytes, pinned), oldest first, for the /workers endpoint."""
        with self._lock:
            return CacheSnapshot(
                disk=self._disk.snapshot(self._pinned),
                cpu=self._cpu.snapshot(self._pinned),
                device=self._device.snapshot(self._pinned),
            )

    # -- internals (the lock is held) ---------------------------------------------------------

    def _fetch_locked(self, key: str, source: AdapterSource, keep: set[str]) -> Path:
        cached = self._disk.get(key)
        if cached is not None and cached.path.is_file():
            return cached.path
        if isinstance(source, Path):
            path, owned = source, False
        else:
            fetch = source if source is not None else self._fetch
            if fetch is None:
                raise KeyError(f"adapter {key!r} is not cached and no fetch was given")
            path, owned = Path(fetch(key)), True
        if not path.is_file():
            raise FileNotFoundError(f"adapter {key!r}: {path} is not a file")
        self._disk.entries[key] = _Entry(_DiskFile(path, owned), path.stat().st_size)
        self._disk.entries.move_to_end(key)
        self._enforce_limits(keep)
        return path

    def _load_locked(self, key: str, source: AdapterSource, keep: set[str]) -> LoraAdapterWeights:
        weights = self._cpu.get(key)
        if weights is None:
            weights = self._load(self._fetch_locked(key, source, keep))
            self._cpu.entries[key] = _Entry(weights, weights.nbytes)
            self._enforce_limits(keep)
        return weights

    def _activate_locked(self, key: str, source: AdapterSource, keep: set[str]) -> ResidentAdapter:
        resident = self._device.get(key)
        if resident is None:
            resident = self._make_resident(key, self._load_locked(key, source, keep))
            self._device.entries[key] = _Entry(resident, resident.nbytes)
            self._enforce_limits(keep)
        return resident

    def _enforce_limits(self, keep: set[str]) -> None:
        spared = keep | self._pinned
        for tier, store in (("device", self._device), ("cpu", self._cpu), ("disk", self._disk)):
            if not store.over_limit():
                continue
            for key in store.victims(spared):
                self._drop(tier, key)  # type: ignore[arg-type]
            if store.over_limit():
                logger.warning(
                    "adapter cache %s tier stays over its limit (pinned or in use)", tier
                )

    def _drop(self, tier: Tier, key: str) -> None:
        if tier == "device":
            entry = self._device.entries.pop(key, None)
            if entry is not None and self._on_device_evict is not None:
                self._on_device_evict(entry.value)
        elif tier == "cpu":
            self._cpu.entries.pop(key, None)
        else:
            disk_entry = self._disk.entries.pop(key, None)
            if disk_entry is not None and disk_entry.value.owned and self._delete_evicted_files:
                disk_entry.value.path.unlink(missing_ok=True)
