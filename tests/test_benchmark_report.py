"""The inference benchmark's report: runs merge by setting, one row per allocator, other text kept."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_inference.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_inference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entry(size: int, seconds: float, allocator: str | None = None, heap: bool = True) -> dict:
    side = {"seconds": seconds, "rss_increase_mb": 300.0, "heap_increase_mb": 150.0 if heap else None}
    entry = {
        "device": "CPU (x86_64, 2 threads)",
        "device_type": "cpu",
        "image_size": size,
        "volume_shape": [256, 256, 96],
        "organs": ["liver", "spleen"],
        "ours": side,
        "baseline": {**side, "seconds": 2 * seconds, "rss_increase_mb": 400.0, "heap_increase_mb": 375.0},
        "speedup": 2.0,
        "memory_ratio": 0.9,
        "memory_ratio_rss_increase": 0.75,
        "memory_ratio_heap_increase": 0.4 if heap else None,
        "memory_ratio_cuda": None,
        "oracle": None,
        "command": f"python scripts/benchmark_inference.py --image-sizes {size}",
    }
    if allocator is not None:
        entry["allocator"] = allocator
    return entry


def test_merge_keeps_one_entry_per_setting_and_allocator(bench):
    old = [_entry(512, 100.0), _entry(1024, 900.0)]  # written before the allocator was recorded
    new = [_entry(512, 90.0, "glibc"), _entry(512, 80.0, "tcmalloc", heap=False)]
    merged = bench.merge_entries(old, new)
    settings = [(e.get("allocator", "glibc"), e["image_size"], e["ours"]["seconds"]) for e in merged]
    assert settings == [("glibc", 512, 90.0), ("glibc", 1024, 900.0), ("tcmalloc", 512, 80.0)]


def test_table_names_the_allocator_and_keeps_the_rest(bench, tmp_path):
    md = tmp_path / "results.md"
    md.write_text(f"# Results\n\n{bench.SECTION}\n\n{bench.MARK_BEGIN}\nold table\n{bench.MARK_END}\n\nprose kept\n")
    bench.update_results_md(md, [_entry(512, 90.0), _entry(512, 80.0, "tcmalloc", heap=False)])
    text = md.read_text()
    assert "old table" not in text and text.endswith("prose kept\n")
    rows = [line for line in text.splitlines() if line.startswith("| CPU")]
    assert len(rows) == 2
    assert rows[0].startswith("| CPU (x86_64, 2 threads) | 512 |") and "| 300 / 400 (0.75) | 150 / 375 (0.40) |" in rows[0]
    # glibc's heap counters mean nothing under another allocator: no heap figure in its row
    assert rows[1].startswith("| CPU (x86_64, 2 threads), tcmalloc | 512 |") and "| - |" in rows[1]
