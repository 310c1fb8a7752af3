#!/usr/bin/env python
"""Latency of the first and the second click on one 3D image: this app vs MONAI Label's ``sam_3d``.

Both serve a MONAI Label infer request (``{"image": ..., "foreground": [[x, y, z], ...]}``) on
the same abdominal CT phantom (NIfTI, default 256 x 256 x 24 at 5 mm, centred on the slice where
the liver is largest: the first click is there, the second 4 slices further), with the same SAM2
size and input size and the same random weights saved in the official checkpoint format (no
weights can be downloaded here; speed does not depend on the values):

- ``ours``: ``monai_sam_interactive`` (`monai_sam.label.infer.InteractiveSam2Infer`): the first
  click encodes every slice once and keeps the features; the second click (another slice of the
  same organ: two conditioning frames) reuses them and only runs the memory propagation, both
  directions through the whole volume.
- ``builtin``: MONAI Label 0.8.5's ``Sam2InferTask`` with ``dimension=3`` (what its ``sam_3d``
  is), called as its server calls it. It writes every slice as a JPEG (first click), keeps a
  ``SAM2VideoPredictor`` state per image, and on each click re-encodes the frames it propagates
  through: forward only, from the earliest clicked slice to the last one.

Nothing of MONAI Label is patched: its checkpoint/config download is avoided by its own
settings (``MONAI_SAM_MODEL_PT`` / ``MONAI_SAM_MODEL_CFG`` name the size's files) and by
placing those files in its model folder beforehand (``download_file`` skips existing files);
the config is sam2's packaged one with ``image_size`` (and the memory attention's RoPE size)
set to ``--image-size``. Both models are built before timing (each side's first request would
otherwise include it). Each side runs in a fresh process, one after the other, with
``--threads`` intra-op threads (1 by default: the machine is shared, and OpenMP threads spinning
against other processes distort small operations); the load average is recorded.

Writes ``docs/results_label.json`` (``second_click_speedup`` = built-in s / ours s for the
headline size, MONAI Label's default ``sam2.1_hiera_l`` when measured; every size under
``runs``) and the table between the markers of the "MONAI Label app" section of
``docs/results.md``.

    python scripts/benchmark_label.py                        # hiera-t and hiera-l, 512 px, CPU
    python scripts/benchmark_label.py --sizes sam2.1_hiera_t --image-size 1024 --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmark this checkout whatever copy of monai_sam is installed
logger = logging.getLogger("benchmark_label")

CONFIG_NAMES = {  # official file names (MONAI Label derives its local file names from these)
    "sam2.1_hiera_t": ("sam2.1_hiera_tiny.pt", "sam2.1_hiera_t.yaml"),
    "sam2.1_hiera_s": ("sam2.1_hiera_small.pt", "sam2.1_hiera_s.yaml"),
    "sam2.1_hiera_b+": ("sam2.1_hiera_base_plus.pt", "sam2.1_hiera_b+.yaml"),
    "sam2.1_hiera_l": ("sam2.1_hiera_large.pt", "sam2.1_hiera_l.yaml"),
}
HF = "https://huggingface.co/facebook"  # only to form the URLs whose basenames MONAI Label uses
MARK_BEGIN = "<!-- BEGIN label-benchmark (scripts/benchmark_label.py writes this table) -->"
MARK_END = "<!-- END label-benchmark -->"
SECTION = "## MONAI Label app (interactive clicks)"


# ----------------------------------------------------------------------------------- data
def make_case(folder: Path, shape: tuple[int, int, int], seed: int) -> dict:
    """A CT phantom NIfTI centred on the liver's largest slice, and two clicks on the liver.

    The first click is on the middle slice (where the liver is largest), the second 4 slices
    further in the direction the built-in propagates (towards the last slice). The built-in only
    propagates forward from its earliest clicked slice, so a centred first click is the neutral
    placement: it then processes about half the volume, ours all of it.
    """
    import nibabel as nib

    from monai_sam.data.phantom import LIVER, make_phantom

    nz = shape[2]
    spacing = (1.6, 1.6, 5.0)
    long = max(3 * nz, 64)  # 320 mm or more: the whole liver, whatever the crop
    ph = make_phantom("ct", seed=seed, shape=(shape[0], shape[1], long), spacing=spacing)
    counts = (ph.label == LIVER).sum(axis=(0, 1))
    centre_k = int(np.argmax(counts))
    z0 = min(max(centre_k - nz // 2, 0), long - nz)
    image = ph.image[..., z0 : z0 + nz]
    label = ph.label[..., z0 : z0 + nz]
    affine = ph.affine.copy()
    affine[:3, 3] += affine[:3, 2] * z0  # the crop's first slice
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), str(folder / "ct.nii.gz"))
    k1 = centre_k - z0
    k2 = min(k1 + 4, nz - 1)
    if k2 == k1 or not (label[..., k2] == LIVER).any():
        raise RuntimeError(
            f"phantom seed {seed}: no liver 4 slices after its largest slice; try another --seed"
        )

    def centre(k: int) -> list[int]:
        ii, jj = np.nonzero(label[..., k] == LIVER)
        c = int(np.argmin((ii - ii.mean()) ** 2 + (jj - jj.mean()) ** 2))
        return [int(ii[c]), int(jj[c]), k]

    return {"image": str(folder / "ct.nii.gz"), "clicks": [centre(k1), centre(k2)], "shape": list(shape)}


def make_weights(folder: Path, size: str, image_size: int) -> tuple[Path, Path]:
    """Random weights of ``size`` in the official format, and sam2's config at ``image_size``."""
    import torch

    from monai_sam.networks import build_sam2_model

    torch.manual_seed(0)
    return export_weights(build_sam2_model(size, image_size=image_size), folder, size, image_size)


def export_weights(model, folder: Path, size: str, image_size: int) -> tuple[Path, Path]:
    """A SAM2 model's weights as the official file MONAI Label reads, and sam2's config at ``image_size``."""
    import sam2
    import torch
    import yaml

    pt_name, cfg_name = CONFIG_NAMES[size]
    pt = folder / pt_name
    torch.save({"model": model.state_dict()}, pt)
    cfg = yaml.safe_load((Path(sam2.__file__).parent / "configs" / "sam2.1" / cfg_name).read_text())
    feat = image_size // 16
    cfg["model"]["image_size"] = image_size
    for part in ("self_attention", "cross_attention"):
        cfg["model"]["memory_attention"]["layer"][part]["feat_sizes"] = [feat, feat]
    (folder / cfg_name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return pt, folder / cfg_name


# ----------------------------------------------------------------------------------- workers
def _requests(case: dict) -> list[dict]:
    c1, c2 = case["clicks"]
    return [
        {"image": case["image"], "foreground": [c1], "background": [], "label": "liver"},
        {"image": case["image"], "foreground": [c1, c2], "background": [], "label": "liver"},
    ]


def _label_stats(path: str) -> dict:
    import nibabel as nib

    arr = np.asarray(nib.load(path).dataobj)
    return {
        "foreground_voxels": int((arr > 0).sum()),
        "slices_with_label": int((arr > 0).any(axis=(0, 1)).sum()),
    }


def worker_ours(opts: argparse.Namespace, case: dict, weights: Path) -> dict:
    from monai_sam.label.engine import LabelModelSettings, Sam2LabelEngine
    from monai_sam.label.infer import InteractiveSam2Infer

    engine = Sam2LabelEngine(
        LabelModelSettings(
            checkpoint=str(weights),
            model_size=opts.size,
            image_size=opts.image_size,
            window="abdomen",
            label_names={1: "liver"},
            device=opts.device,
            encoder_batch_size=opts.encoder_batch_size,
        )
    )
    task = InteractiveSam2Infer(engine)
    engine.model()  # build before timing, as the built-in's predictor is
    out = {}
    for name, request in zip(("first", "second"), _requests(case), strict=True):
        t0 = time.perf_counter()
        path, result = task(dict(request))
        out[f"{name}_s"] = time.perf_counter() - t0
        out[f"{name}_feature_cache"] = result["feature_cache"]
        out[f"{name}_label"] = _label_stats(path)
        os.unlink(path)
    out["encoded_slices"] = engine.store.stats.encoded_slices
    return out


def worker_builtin(opts: argparse.Namespace, case: dict, weights: Path) -> dict:
    from monailabel.sam2.infer import Sam2InferTask
    from sam2.build_sam import build_sam2_video_predictor

    task = Sam2InferTask(model_dir=str(weights.parent), dimension=3)
    # what its first request does before anything else: build the predictor for the device
    task.predictors[opts.device] = build_sam2_video_predictor(task.config_path, task.path, device=opts.device)
    out = {}
    for name, request in zip(("first", "second"), _requests(case), strict=True):
        t0 = time.perf_counter()
        path, _ = task({**request, "device": opts.device})
        out[f"{name}_s"] = time.perf_counter() - t0
        out[f"{name}_label"] = _label_stats(path)
        os.unlink(path)
    return out


def worker(opts: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(opts.threads)
    case = json.loads(Path(opts.case).read_text())
    weights = Path(opts.weights)
    fn = worker_ours if opts.worker == "ours" else worker_builtin
    result = fn(opts, case, weights)
    result["load_after"] = os.getloadavg()[0]
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(
    kind: str, size: str, case_file: Path, weights: Path, opts: argparse.Namespace, tmp: Path
) -> dict:
    pt_name, cfg_name = CONFIG_NAMES[size]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(opts.threads),
        "MONAI_SAM_MODEL_PT": f"{HF}/{size.replace('_', '-')}/resolve/main/{pt_name}",
        "MONAI_SAM_MODEL_CFG": f"{HF}/{size.replace('_', '-')}/resolve/main/{cfg_name}",
        "MONAI_LABEL_DATASTORE_CACHE_PATH": str(tmp / f"mlcache_{kind}"),
    }
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--case",
        str(case_file),
        "--weights",
        str(weights),
        "--size",
        size,
        "--image-size",
        str(opts.image_size),
        "--device",
        opts.device,
        "--threads",
        str(opts.threads),
        "--encoder-batch-size",
        str(opts.encoder_batch_size),
    ]
    load_before = os.getloadavg()[0]
    logger.info("running %s (%s, %d px)", kind, size, opts.image_size)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{kind} worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    result = json.loads(lines[-1][len("RESULT ") :])
    result["load_before"] = load_before
    logger.info("%s: first %.1f s, second %.1f s", kind, result["first_s"], result["second_s"])
    return result


# ----------------------------------------------------------------------------------- report
def device_name(device: str, threads: int) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.machine()}, {threads} thread{'s' if threads > 1 else ''})"


def table(entries: list[dict]) -> str:
    rows = [
        "| device | SAM2 size | image size | volume | ours: 1st click (s) | ours: 2nd click (s) "
        "| built-in sam_3d: 1st (s) | built-in sam_3d: 2nd (s) | 2nd-click speedup | load avg | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        o, b = e["ours"], e["builtin"]
        load = max(o["load_before"], o["load_after"], b["load_before"], b["load_after"])
        rows.append(
            f"| {e['device']} | {e['size']} | {e['image_size']} | {'x'.join(map(str, e['volume']))} "
            f"| {o['first_s']:.1f} | {o['second_s']:.1f} | {b['first_s']:.1f} | {b['second_s']:.1f} "
            f"| **{e['second_click_speedup']:.1f}x** | {load:.1f} | `{e['command']}` |"
        )
    return "\n".join(rows)


def update_results_md(path: Path, entries: list[dict]) -> None:
    """Replace the table between the markers (adding the section the first time), atomically."""
    from monai_sam.utils import replace_marked_block

    replace_marked_block(
        path,
        MARK_BEGIN,
        MARK_END,
        table(entries),
        f"{SECTION}\n\n"
        "Latency of one click on a 3D image through MONAI Label's infer task interface, first and "
        "second click on the same image (the second adds a click on another slice of the same "
        "organ): this app (`monai_sam_interactive`) vs MONAI Label 0.8.5's built-in `sam_3d`, same "
        "SAM2 size, input size, image and random weights (`scripts/benchmark_label.py`; how the "
        "built-in is run and what differs is in its docstring). Ours propagates both directions "
        "through the whole volume; the built-in only forward from the earliest clicked slice.",
    )


def write_json(path: Path, doc: dict) -> None:
    from monai_sam.utils import write_text_atomic

    write_text_atomic(path, json.dumps(doc, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--sizes", nargs="+", default=["sam2.1_hiera_t", "sam2.1_hiera_l"], choices=sorted(CONFIG_NAMES)
    )
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 24], metavar=("X", "Y", "Z"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--encoder-batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=ROOT / "docs" / "results_label.json")
    p.add_argument("--results-md", type=Path, default=ROOT / "docs" / "results.md")
    # internal: one side in a fresh process
    p.add_argument("--worker", choices=["ours", "builtin"], help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.worker:
        logging.basicConfig(level=logging.WARNING)
        worker(opts)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    command = "python scripts/benchmark_label.py " + " ".join(sys.argv[1:])
    entries = []
    with tempfile.TemporaryDirectory(prefix="benchmark_label_") as tmp_:
        tmp = Path(tmp_)
        case = make_case(tmp, tuple(opts.shape), opts.seed)
        case_file = tmp / "case.json"
        case_file.write_text(json.dumps(case))
        for size in opts.sizes:
            wdir = tmp / size
            wdir.mkdir()
            weights, _ = make_weights(wdir, size, opts.image_size)
            ours = run_worker("ours", size, case_file, weights, opts, tmp)
            builtin = run_worker("builtin", size, case_file, weights, opts, tmp)
            entries.append(
                {
                    "device": device_name(opts.device, opts.threads),
                    "size": size,
                    "image_size": opts.image_size,
                    "volume": list(opts.shape),
                    "clicks": case["clicks"],
                    "ours": ours,
                    "builtin": builtin,
                    "second_click_speedup": builtin["second_s"] / ours["second_s"],
                    "first_click_speedup": builtin["first_s"] / ours["first_s"],
                    "command": command.strip(),
                }
            )
            shutil.rmtree(wdir)
    headline = next((e for e in entries if e["size"] == "sam2.1_hiera_l"), entries[0])
    doc = {
        "benchmark": "MONAI Label, first and second click on one 3D image: monai_sam_interactive vs sam_3d",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "second_click_speedup": headline["second_click_speedup"],
        "headline_size": headline["size"],
        "second_click_speedup_by_size": {e["size"]: e["second_click_speedup"] for e in entries},
        "target": "second click at least 5x faster than the built-in sam_3d",
        "weights": "random init in the official checkpoint format (speed does not depend on the values)",
        "runs": entries,
    }
    write_json(opts.output, doc)
    update_results_md(opts.results_md, entries)
    logger.info("wrote %s and the table in %s", opts.output, opts.results_md)
    for e in entries:
        logger.info("%s: second-click speedup %.2fx", e["size"], e["second_click_speedup"])


if __name__ == "__main__":
    main()
