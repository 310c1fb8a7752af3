"""Feature cache: hits after the first pass, misses on any key change, corruption, size cap."""

import torch

from monai_sam.engines.feature_cache import FeatureCache, encoder_identity, tensor_content_hash


class CountingEncoder(torch.nn.Module):
    """A stand-in encoder that counts how many slices it really encoded."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.calls = 0

    def features(self, batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        self.calls += len(batch)
        with torch.no_grad():
            y = self.conv(batch)
        return [{"level0": f, "pooled": f.mean(dim=(1, 2))} for f in y]


def _slices(n=5, seed=1):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_second_pass_reads_cache_and_values_are_identical(tmp_path):
    enc = CountingEncoder()
    cache = FeatureCache(tmp_path, encoder_identity("toy", enc, 8), ram_bytes=0)
    x = _slices()
    first = cache.get_or_compute(x, enc.features, batch_size=2)
    assert enc.calls == 5 and cache.stats.misses == 5
    second = cache.get_or_compute(x, enc.features, batch_size=2)
    assert enc.calls == 5, "second pass must not re-encode"
    assert cache.stats.hits == 5
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k])
    # a new cache object over the same folder (next process / epoch) reads from disk
    again = FeatureCache(tmp_path, encoder_identity("toy", enc, 8))
    assert again.stats.disk_bytes > 0
    again.get_or_compute(x, enc.features)
    assert enc.calls == 5 and again.stats.hits == 5


def test_any_key_change_misses(tmp_path):
    enc = CountingEncoder(0)
    base = encoder_identity("toy", enc, 8, {"window": "abdomen"})
    assert base != encoder_identity("toy", enc, 16, {"window": "abdomen"})  # image size
    assert base != encoder_identity("toy", enc, 8, {"window": "liver"})  # preprocessing
    assert base != encoder_identity("other", enc, 8, {"window": "abdomen"})  # encoder name
    assert base != encoder_identity("toy", CountingEncoder(1), 8, {"window": "abdomen"})  # weights
    x = _slices()
    assert tensor_content_hash(x[0]) != tensor_content_hash(x[0] + 1e-3)  # content
    cache = FeatureCache(tmp_path, base)
    cache.get_or_compute(x, enc.features)
    other = FeatureCache(tmp_path, encoder_identity("toy", enc, 8, {"window": "liver"}))
    other.get_or_compute(x, enc.features)
    assert enc.calls == 10 and other.stats.hits == 0


def test_corrupted_entry_is_detected_and_recomputed(tmp_path):
    enc = CountingEncoder()
    cache = FeatureCache(tmp_path, encoder_identity("toy", enc, 8))
    x = _slices(2)
    ref = cache.get_or_compute(x, enc.features)
    entry = next(cache.root.rglob("*.feat"))
    data = bytearray(entry.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the payload
    entry.write_bytes(bytes(data))
    fresh = FeatureCache(tmp_path, cache.identity)
    got = fresh.get_or_compute(x, enc.features)
    assert fresh.stats.corrupted == 1
    assert enc.calls == 3  # only the corrupted slice was recomputed
    for a, b in zip(ref, got):
        assert torch.allclose(a["level0"], b["level0"], atol=1e-6)
    # truncated entry too
    entry = next(fresh.root.rglob("*.feat"))
    entry.write_bytes(entry.read_bytes()[:20])
    assert FeatureCache(tmp_path, cache.identity).get(entry.stem) is None


def test_size_cap_stops_writing_but_still_returns_features(tmp_path):
    enc = CountingEncoder()
    x = _slices(6)
    probe = FeatureCache(tmp_path / "probe", "probe")
    probe.get_or_compute(x[:1], enc.features)
    entry_bytes = probe.stats.disk_bytes
    cache = FeatureCache(tmp_path, encoder_identity("toy", enc, 8), max_disk_bytes=int(2.5 * entry_bytes))
    out = cache.get_or_compute(x, enc.features)
    assert len(out) == 6
    assert len(list(cache.root.rglob("*.feat"))) == 2
    assert cache.stats.skipped_writes == 4
    assert cache.stats.disk_bytes <= cache.max_disk_bytes


def test_ram_tier_serves_without_disk(tmp_path):
    enc = CountingEncoder()
    cache = FeatureCache(tmp_path, encoder_identity("toy", enc, 8), ram_bytes=10**7)
    x = _slices(3)
    cache.get_or_compute(x, enc.features)
    for p in cache.root.rglob("*.feat"):
        p.unlink()
    cache.get_or_compute(x, enc.features)
    assert cache.stats.ram_hits == 3 and enc.calls == 3
