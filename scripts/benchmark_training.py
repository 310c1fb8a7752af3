"""Seconds per training epoch with and without the frozen encoder's feature cache.

Same data, same seed, same trainer; only the cache differs. Epoch 1 with the cache fills it
(and costs a little more than no cache); later epochs read it. The figure that matters is a
later cached epoch against an uncached one:

    python scripts/benchmark_training.py                       # hiera-t at 512 px (CPU or GPU)
    python scripts/benchmark_training.py --settings sam2.1_hiera_t:512 sam2.1_hiera_s:1024
    python scripts/benchmark_training.py --num-slices 1 --volumes 16   # single slices: decoder only

Settings measured earlier stay in the JSON and the table unless measured again.

Writes docs/results_training.json (``cache_speedup`` = uncached / cached seconds per epoch,
one entry per setting) and the "Training (feature cache)" section of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monai_sam.data import make_phantom  # noqa: E402
from monai_sam.engines import FeatureCache, FrozenEncoderTrainer, collate_as_list, encoder_identity  # noqa: E402
from monai_sam.engines import trainable_param_groups  # noqa: E402
from monai_sam.networks import Sam2VolumeSegmenter, build_sam2_model  # noqa: E402
from monai_sam.prompts import ObjectPrompts, SlicePrompt  # noqa: E402
from monai_sam.transforms import CTWindow, SamInput, box_from_mask  # noqa: E402

SECTION = "Training (feature cache)"


def sequences(image_size: int, volumes: int, num_slices: int, objects: int) -> list[dict]:
    """Fixed slice sequences of phantoms, ``objects`` organs each with a box on the middle slice
    (a different choice of organs per volume), as the CT bundle trains."""
    out = []
    for seed in range(volumes):
        ph = make_phantom("ct", seed)
        z0 = ph.image.shape[2] // 2 - num_slices // 2
        lab = torch.as_tensor(ph.label[None, :, :, z0 : z0 + num_slices].astype(np.int64))
        lab[lab == 6] = 1
        key = num_slices // 2
        organs = [o for o in range(1, 6) if (lab[0, :, :, key] == o).any()]
        organs = (organs[seed % len(organs):] + organs[: seed % len(organs)])[:objects]
        prompts = [
            ObjectPrompts(o, slices=[SlicePrompt(key, box=box_from_mask(lab[0, :, :, key].numpy() == o))])
            for o in organs
        ]
        img = CTWindow("abdomen")(torch.as_tensor(ph.image[None, :, :, z0 : z0 + num_slices]))
        out.append({"image": SamInput(image_size)(img).as_tensor(), "label": lab, "prompts": prompts})
    return out


def epoch_times(model_size: str, image_size: int, data: list[dict], epochs: int, cache_dir: Path | None,
                device: torch.device) -> list[float]:
    torch.manual_seed(0)
    seg = Sam2VolumeSegmenter(build_sam2_model(model_size, image_size=image_size, device=device, mode="train"),
                              memory_dtype=None)
    opt = torch.optim.AdamW(trainable_param_groups(seg.model, {"mask_decoder": 1e-4, "memory_attention": 5e-5}))
    cache = None
    if cache_dir is not None:
        cache = FeatureCache(cache_dir, encoder_identity(model_size, seg.model.image_encoder, image_size))
    trainer = FrozenEncoderTrainer(device, epochs, DataLoader(data, batch_size=1, collate_fn=collate_as_list),
                                   seg, opt, feature_cache=cache, amp=device.type == "cuda")
    times: list[float] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: times.append(time.perf_counter()))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: times.__setitem__(-1, time.perf_counter() - times[-1]))
    trainer.run()
    return times


def write_section(rows: list[dict], path: Path) -> None:
    """Replace this benchmark's section of docs/results.md (between its marker comments)."""
    begin, end = f"<!-- begin: {SECTION} -->", f"<!-- end: {SECTION} -->"
    lines = [begin, f"## {SECTION}", "",
             "Seconds per training epoch of the frozen-encoder trainer, with the encoder's features "
             "recomputed every epoch (no cache) or read from the cache (epochs after the first). "
             "Random-init weights (speed does not depend on them). Command: "
             "`python scripts/benchmark_training.py`.", "",
             "| model | px | device | sequences x slices x organs | no cache s/epoch | cache fill (epoch 1) s | cached s/epoch | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model_size']} | {r['image_size']} | {r['device']} | {r['volumes']} x {r['num_slices']} x {r.get('objects', 5)} | "
                     f"{r['uncached_s_per_epoch']:.1f} | {r['cache_fill_s']:.1f} | {r['cached_s_per_epoch']:.1f} | "
                     f"{r['cache_speedup']:.2f}x |")
    lines.append(end)
    text = path.read_text() if path.exists() else "# Results\n"
    if begin in text:
        text = text[: text.index(begin)] + "\n".join(lines) + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    path.write_text(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["sam2.1_hiera_t:512"], help="MODEL:PIXELS pairs")
    p.add_argument("--volumes", type=int, default=4)
    p.add_argument("--num-slices", type=int, default=4, help="slices per sequence (the CT bundle's default)")
    p.add_argument("--objects", type=int, default=2, help="organs per sequence (the CT bundle's default)")
    p.add_argument("--epochs", type=int, default=3, help="cached run: epoch 1 fills, the rest read")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results_training.json")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for setting in args.settings:
        model_size, px = setting.split(":")
        data = sequences(int(px), args.volumes, args.num_slices, args.objects)
        uncached = epoch_times(model_size, int(px), data, 2, None, device)
        with tempfile.TemporaryDirectory() as tmp:
            cached = epoch_times(model_size, int(px), data, args.epochs, Path(tmp), device)
        row = {
            "model_size": model_size, "image_size": int(px), "device": torch.cuda.get_device_name()
            if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads, {platform.processor() or 'x86_64'})",
            "volumes": args.volumes, "num_slices": args.num_slices, "objects": args.objects,
            "uncached_s_per_epoch": float(np.mean(uncached)), "cache_fill_s": cached[0],
            "cached_s_per_epoch": float(np.mean(cached[1:])),
        }
        row["cache_speedup"] = row["uncached_s_per_epoch"] / row["cached_s_per_epoch"]
        print(json.dumps(row))
        rows.append(row)
    # keep earlier settings (other sizes, sequence shapes) unless this run measured them again
    def key(r: dict) -> tuple:
        return r["model_size"], r["image_size"], r["device"], r["volumes"], r["num_slices"], r.get("objects", 5)

    earlier = json.loads(args.out.read_text())["settings"] if args.out.exists() else []
    measured = {key(r) for r in rows}
    rows = [r for r in earlier if key(r) not in measured] + rows
    args.out.write_text(json.dumps({"benchmark": "training", "settings": rows}, indent=2))
    write_section(rows, ROOT / "docs" / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
