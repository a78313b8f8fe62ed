"""AdapterCache tiers, eviction, pinning, and flat memory over many adapters."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from tests.engine.conftest_inference import (
    lora_writer,
    rss_bytes,
    single_cpu_thread,
    tiny_pipeline_dir,
)
from tests.fixtures.random_lora import RandomLoraSpec, RandomLoraWriter
from workers.engine.inference import (
    DEFAULT_TARGET_MODULES,
    AdapterCache,
    LoraSlotPool,
    load_lora_file,
)
from workers.engine.inference.cache import CacheSnapshot

__all__ = ["lora_writer", "single_cpu_thread", "tiny_pipeline_dir"]


@pytest.fixture(scope="module")
def pool(tiny_pipeline_dir: Path) -> LoraSlotPool:
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    return LoraSlotPool(
        {"unet": pipeline.unet, "text_encoder": pipeline.text_encoder}, max_active=2, max_rank=8
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, lora_writer: RandomLoraWriter) -> Path:
    """A stand-in artifact store: a directory of adapter files named <key>.safetensors."""
    root = tmp_path_factory.mktemp("store")
    for index in range(6):
        lora_writer.write(root / f"k{index}.safetensors", RandomLoraSpec(rank=4), seed=index)
    return root


class CopyingFetch:
    """Downloads from the store by copying into a local directory; counts its calls."""

    def __init__(self, store: Path, local: Path) -> None:
        self.store, self.local = store, local
        self.calls: list[str] = []

    def __call__(self, key: str) -> Path:
        self.calls.append(key)
        self.local.mkdir(parents=True, exist_ok=True)
        return Path(
            shutil.copy(self.store / f"{key}.safetensors", self.local / f"{key}.safetensors")
        )


def _cache(
    pool: LoraSlotPool,
    fetch: CopyingFetch,
    *,
    device_limit_count: int | None = 64,
    cpu_limit_bytes: int | None = None,
    disk_limit_bytes: int | None = None,
    delete_evicted_files: bool = False,
) -> AdapterCache:
    return AdapterCache(
        make_resident=pool.make_resident,
        on_device_evict=pool.release,
        fetch=fetch,
        device_limit_count=device_limit_count,
        cpu_limit_bytes=cpu_limit_bytes,
        disk_limit_bytes=disk_limit_bytes,
        delete_evicted_files=delete_evicted_files,
    )


def _snapshot_keys(snapshot: CacheSnapshot, tier: str) -> list[str]:
    return [entry["key"] for entry in snapshot[tier]["entries"]]


def _keys(cache: AdapterCache, tier: str) -> list[str]:
    return _snapshot_keys(cache.snapshot(), tier)


def test_steps_are_idempotent(pool: LoraSlotPool, store: Path, tmp_path: Path) -> None:
    fetch = CopyingFetch(store, tmp_path)
    cache = _cache(pool, fetch)

    path = cache.fetch("k0")
    assert cache.fetch("k0") == path
    weights = cache.load("k0")
    assert cache.load("k0") is weights
    resident = cache.activate("k0")
    assert cache.activate("k0") is resident
    assert fetch.calls == ["k0"]

    snapshot = cache.snapshot()
    holding = {t for t in ("disk", "cpu", "device") if _snapshot_keys(snapshot, t) == ["k0"]}
    assert holding == {"disk", "cpu", "device"}
    assert snapshot["cpu"]["entries"] == [{"key": "k0", "bytes": weights.nbytes, "pinned": False}]
    assert snapshot["device"]["bytes"] == resident.nbytes > 0
    assert snapshot["disk"]["bytes"] == path.stat().st_size


def test_device_tier_evicts_least_recently_used(
    pool: LoraSlotPool, store: Path, tmp_path: Path
) -> None:
    cache = _cache(pool, CopyingFetch(store, tmp_path), device_limit_count=2)
    cache.activate("k0")
    cache.activate("k1")
    cache.activate("k0")  # k1 is now the least recently used
    cache.activate("k2")

    assert _keys(cache, "device") == ["k0", "k2"]
    assert _keys(cache, "cpu") == ["k0", "k1", "k2"]


def test_pinned_adapters_stay_until_unpinned(
    pool: LoraSlotPool, store: Path, tmp_path: Path
) -> None:
    cache = _cache(pool, CopyingFetch(store, tmp_path), device_limit_count=2)
    cache.pin("k0")
    for key in ("k0", "k1", "k2", "k3"):
        cache.activate(key)

    assert _keys(cache, "device") == ["k0", "k3"]
    with pytest.raises(ValueError, match="pinned"):
        cache.evict("k0")
    assert cache.snapshot()["device"]["entries"][0]["pinned"] is True

    cache.unpin("k0")
    cache.activate("k4")
    assert _keys(cache, "device") == ["k3", "k4"]


def test_cpu_and_disk_limits_in_bytes(pool: LoraSlotPool, store: Path, tmp_path: Path) -> None:
    fetch = CopyingFetch(store, tmp_path / "local")
    one_adapter = cache_bytes = _cache(pool, fetch).load("k0").nbytes
    file_size = (store / "k0.safetensors").stat().st_size
    cache = _cache(
        pool,
        fetch,
        cpu_limit_bytes=2 * one_adapter,
        disk_limit_bytes=2 * file_size + 100,
        delete_evicted_files=True,
    )
    for key in ("k0", "k1", "k2"):
        cache.load(key)

    assert _keys(cache, "cpu") == ["k1", "k2"]
    assert cache.snapshot()["cpu"]["bytes"] <= 2 * cache_bytes
    assert _keys(cache, "disk") == ["k1", "k2"]
    assert not (tmp_path / "local" / "k0.safetensors").exists()  # fetched copy deleted
    assert (store / "k0.safetensors").exists()


def test_activate_many_never_evicts_its_own_adapters(
    pool: LoraSlotPool, store: Path, tmp_path: Path
) -> None:
    cache = _cache(pool, CopyingFetch(store, tmp_path), device_limit_count=2)
    residents = cache.activate_many([("k0", None), ("k1", None)])
    residents += cache.activate_many([("k2", None), ("k0", None)])

    assert [r.key for r in residents] == ["k0", "k1", "k2", "k0"]
    assert sorted(_keys(cache, "device")) == ["k0", "k2"]


def test_local_paths_are_used_without_fetch_and_never_deleted(
    pool: LoraSlotPool, store: Path
) -> None:
    cache = AdapterCache(
        make_resident=pool.make_resident, disk_limit_bytes=1, delete_evicted_files=True
    )
    cache.load("k0", store / "k0.safetensors")
    cache.load("k1", store / "k1.safetensors")

    assert (store / "k0.safetensors").exists()
    with pytest.raises(KeyError, match="no fetch"):
        cache.load("unknown")


def test_memory_stays_flat_loading_and_evicting_100_adapters(
    tiny_pipeline_dir: Path, lora_writer: RandomLoraWriter, tmp_path: Path
) -> None:
    from workers.engine.inference import AdapterRef, InferenceEngine

    engine = InferenceEngine(
        pipeline_dir=tiny_pipeline_dir,
        max_active=2,
        max_rank=64,
        device_limit_count=4,
        delete_evicted_files=True,
    )
    # Rank 64 on every covered module: about 2 MB per adapter, so 90 leaked adapters would be
    # far beyond the tolerance below.
    spec = RandomLoraSpec(
        rank=64,
        unet_targets=DEFAULT_TARGET_MODULES["unet"],
        text_encoder_targets=DEFAULT_TARGET_MODULES["text_encoder"],
    )
    files = [lora_writer.write(tmp_path / f"m{i}.safetensors", spec, seed=i) for i in range(100)]
    adapter_bytes = load_lora_file(files[0]).nbytes

    def cycle(indices: range) -> None:
        for i in indices:
            engine.switch_adapters([AdapterRef(f"m{i}", files[i], 1.0)])
            engine.cache.evict(f"m{i}")

    cycle(range(10))  # warm up allocator pools and lazy imports
    gc.collect()
    before = rss_bytes()
    cycle(range(10, 100))
    engine.switch_adapters([])
    gc.collect()
    after = rss_bytes()

    snapshot = engine.cache.snapshot()
    assert all(snapshot[tier]["count"] == 0 for tier in ("disk", "cpu", "device"))
    assert 90 * adapter_bytes > 0.2 * before, "adapters too small for the test to mean anything"
    assert after <= before * 1.03, f"RSS grew from {before} to {after}"
