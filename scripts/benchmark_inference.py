#!/usr/bin/env python
"""Benchmark promptable volume inference: the project's inferer vs MONAI Label's SAM2 way.

One abdominal CT phantom (default 256 x 256 x 96), SAM2.1 hiera-t at each ``--image-sizes``,
one box per organ (liver, spleen, kidneys, aorta) on one key slice: the slice nearest the
middle of the volume that shows every organ. Three runs per setting, each in a fresh process
so that its peak memory is its own:

- ``ours``: `MemoryPropagationInferer` with ``preprocess=SamInput(S)``: the ``[0, 1]`` volume
  stays at its size in memory, slices are scaled and encoded in chunks, all organs are tracked
  as one batch, forward and backward from the key slice. No disk.
- ``baseline``: what MONAI Label 0.8.5's built-in SAM2 (``monailabel/sam2/infer.py``,
  ``run_3d``) does: every slice written as JPEG to a cache folder, then per organ (its requests
  carry one object, ``obj_id=1``) ``init_state(video_path=folder)``, ``add_new_points_or_box``
  and ``propagate_in_video``. MONAI Label only propagates forward; here the baseline also runs
  ``reverse=True`` so that both segment the whole volume. Under CUDA it runs in bf16 autocast as
  MONAI Label does; ours then too.
- ``oracle``: sam2's ``SAM2VideoPredictor`` fed the same preprocessed frames as tensors (no
  JPEG): the reference our masks must match. Per object, the IoU of the masks (logit > 0) and,
  since random weights put most pixels above 0, the IoU of the masks split at the oracle's
  per-slice median logit, and the largest logit difference.

Timing starts after the model is built and ends with all organs' masks in memory (the baseline's
JPEG writing included, done once as MONAI Label caches it). ``--repeats N`` alternates the two
N times and keeps the fastest of each, as the machine may be shared (the load average before and
after each run and its CPU seconds are in the JSON). Memory: peak RSS of the process
(CPU) and ``torch.cuda.max_memory_allocated`` (GPU); "rss increase" is the peak minus the RSS
right after the model was built (what the segmentation itself adds). ``encoder_seconds`` (and
``encoder_calls``) is the time spent in the image encoder: the rest is SAM2's tracking, which
both sides run alike. RSS also counts memory
the C allocator keeps after it was freed (fragmentation), so on glibc the peak of the heap in
use (``mallinfo2``, sampled every 20 ms) is recorded too: the CPU analogue of CUDA's
allocated memory, what the method itself holds. ``--malloc-library`` preloads another C
allocator in both sides' processes (tcmalloc or jemalloc, which PyTorch's CPU performance
tuning guide recommends): each allocator's figures are a row of their own.

Writes ``docs/results_inference.json`` (one entry per device x setting, merged with earlier runs:
``speedup`` = baseline s / ours s, ``memory_ratio`` = our peak / baseline peak) and the table
between the markers of the "Inference (memory propagation)" section of ``docs/results.md``.

    python scripts/benchmark_inference.py --quick                  # CPU smoke run, ~2 min
    python scripts/benchmark_inference.py --image-sizes 512 1024   # full settings (GPU)
    python scripts/benchmark_inference.py --image-sizes 512 --no-oracle \
        --malloc-library /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4   # CPU, tcmalloc
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

logger = logging.getLogger("benchmark_inference")

ROOT = Path(__file__).resolve().parents[1]
# benchmark the checkout this script belongs to, whatever copy of monai_sam is installed
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the SAM2VideoPredictor reference (helpers_oracle)
ORGANS = {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left", 5: "aorta"}
MARK_BEGIN = "<!-- BEGIN inference-benchmark (scripts/benchmark_inference.py writes this table) -->"
MARK_END = "<!-- END inference-benchmark -->"
SECTION = "## Inference (memory propagation)"


# ------------------------------------------------------------------------------------ data
def make_case(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int, out: Path) -> dict:
    """Phantom CT -> abdomen window in [0, 1] (``volume.npy``, (X, Y, Z)) and organ boxes on one slice."""
    from monai_sam.data.phantom import make_phantom
    from monai_sam.transforms import CTWindow, box_from_mask

    ph = make_phantom("ct", seed=seed, shape=shape, spacing=spacing)
    volume = np.asarray(CTWindow("abdomen")(ph.image[None]))[0].astype(np.float32)
    np.save(out / "volume.npy", volume)
    present = [v for v in ORGANS if (ph.label == v).any()]
    counts = np.stack([(ph.label == v).any(axis=(0, 1)) for v in present])  # (organs, Z)
    mid = shape[2] // 2
    full = np.flatnonzero(counts.all(axis=0))
    if len(full):
        key = int(full[np.argmin(np.abs(full - mid))])
        organs = present
    else:  # no slice shows them all: the slice showing most, and only those organs
        key = int(np.argmax(counts.sum(axis=0)))
        organs = [v for v in present if (ph.label[..., key] == v).any()]
    prompts = [
        {"id": v, "name": ORGANS[v], "slice": key, "box": box_from_mask(ph.label[..., key] == v).tolist()}
        for v in organs
    ]
    (out / "prompts.json").write_text(json.dumps(prompts))
    return {"key_slice": key, "organs": [ORGANS[v] for v in organs]}


def load_prompts(folder: Path):
    from monai_sam.prompts import ObjectPrompts, SlicePrompt

    return [
        ObjectPrompts(p["id"], p["name"], [SlicePrompt(p["slice"], box=p["box"])])
        for p in json.loads((folder / "prompts.json").read_text())
    ]


# ------------------------------------------------------------------------------------ workers
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


@functools.lru_cache(maxsize=1)
def _allocator() -> str:
    """The C allocator serving ``malloc`` in this process: ``glibc`` unless one was preloaded."""
    with open("/proc/self/maps") as f:
        maps = f.read()
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc"


def _heap_in_use_mb() -> float | None:
    """MB the C allocator has handed out and not taken back (glibc ``mallinfo2``; None elsewhere).

    Unlike RSS this leaves out the freed memory the allocator keeps: the CPU analogue of
    ``torch.cuda.memory_allocated``. Under a preloaded allocator glibc's counters see nothing.
    """
    if _allocator() != "glibc":
        return None
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


class _HeapPeak(threading.Thread):
    """Samples `_heap_in_use_mb` every 20 ms and keeps the largest value.

    A call costs ~10 us, but every wake-up takes a core from one of torch's threads, which
    all wait for it: sampling every 2 ms made a run 25% slower; at 20 ms the cost is within
    the run-to-run spread of a 2-core machine (about 10%). An encoder pass lasts ~0.5 s at
    512 px on a CPU, so its peak is seen.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _heap_in_use_mb()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while self.peak is not None and not self._stop_event.wait(0.02):
            self.peak = max(self.peak, _heap_in_use_mb())

    def stop(self) -> float | None:
        self._stop_event.set()
        self.join()
        return self.peak


def _save_masks(path: Path, masks: np.ndarray) -> None:
    """(N, X, Y, Z) bool -> packed bits (a 5 x 256 x 256 x 96 stack is 4 MB instead of 31)."""
    np.savez_compressed(path, bits=np.packbits(masks.astype(bool), axis=None), shape=np.array(masks.shape))


def _load_masks(path: Path) -> np.ndarray:
    d = np.load(path)
    shape = tuple(int(v) for v in d["shape"])
    return np.unpackbits(d["bits"], count=int(np.prod(shape))).reshape(shape).astype(bool)


class _EncoderClock:
    """Seconds spent in the image encoder, summed over its calls: the rest is tracking.

    Splits a run's time into the part ours saves (the baseline encodes each slice once per
    organ) and the part both sides share (SAM2's per-organ tracking step).
    """

    def __init__(self, encoder, cuda: bool) -> None:
        self.seconds, self.calls, self.cuda, self._t0 = 0.0, 0, cuda, 0.0
        encoder.register_forward_pre_hook(self._start)
        encoder.register_forward_hook(self._stop)

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def _start(self, *_) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def _stop(self, *_) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(args: argparse.Namespace) -> None:
    import torch

    from monai_sam.networks import build_sam2_model, build_sam2_video_predictor_model

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    folder = Path(args.data)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    volume = np.load(folder / "volume.npy")  # (X, Y, Z) in [0, 1]
    prompts = load_prompts(folder)
    h, w, t = volume.shape
    if args.malloc_library and _allocator() == "glibc":
        raise RuntimeError(f"--malloc-library {args.malloc_library} was not loaded (LD_PRELOAD ignored?)")

    # every import before measuring: both sides start from the same process footprint
    from helpers_oracle import video_predictor_logits
    from PIL import Image

    from monai_sam.networks import Sam2VolumeSegmenter, VolumeFrames
    from monai_sam.networks.sam2_volume import frames_from_sam_input
    from monai_sam.transforms import SamInput

    if args.worker == "ours":
        model = build_sam2_model("sam2.1_hiera_t", args.checkpoint, image_size=args.size, device=device)
    else:
        model = build_sam2_video_predictor_model(
            "sam2.1_hiera_t", args.checkpoint, image_size=args.size, device=device
        )
    encoder_clock = _EncoderClock(model.image_encoder, cuda)
    rss_built, heap_built = _rss_mb(), _heap_in_use_mb()
    heap_peak = _HeapPeak()
    heap_peak.start()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    masks = np.zeros((len(prompts), h, w, t), bool)
    logits = None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    def segmenter(sam2_model) -> Sam2VolumeSegmenter:
        autocast_dtype = torch.bfloat16 if cuda else None
        return Sam2VolumeSegmenter(
            sam2_model, encoder_batch_size=args.encoder_batch_size, autocast_dtype=autocast_dtype
        )

    source = VolumeFrames(torch.from_numpy(volume)[None], SamInput(args.size))

    load_before = os.getloadavg()[0]
    cpu0, start = _cpu_seconds(), time.perf_counter()
    if args.worker == "ours":
        # what MemoryPropagationInferer(preprocess=SamInput(S)) runs, with each object's own mask
        # (logit > 0) kept instead of the running argmax over objects, so that the masks can be
        # compared object by object; the logits stream slice by slice, as in the inferer
        def keep_masks(rows: list[int], f: int, slice_logits: torch.Tensor) -> None:
            masks[rows, :, :, f] = (slice_logits > 0).numpy()

        segmenter(model).propagate(source, prompts, sink=keep_masks)
    elif args.worker == "baseline":
        video_dir = Path(tempfile.mkdtemp(prefix="sam2_jpeg_", dir=args.tmp))
        for k in range(t):  # MONAI Label: Image.fromarray(slice).convert("RGB").save(<k:05d>.jpg)
            Image.fromarray(np.rint(volume[..., k] * 255).astype(np.uint8)).convert("RGB").save(
                video_dir / f"{str(k).zfill(5)}.jpg"
            )
        with autocast:
            for n, p in enumerate(prompts):  # one object per request, as MONAI Label sends them
                state = model.init_state(video_path=str(video_dir))
                sp = p.slices[0]
                model.add_new_points_or_box(
                    inference_state=state, frame_idx=sp.slice_index, obj_id=1, box=sp.box
                )
                for reverse in (False, True):
                    for f, _, out in model.propagate_in_video(state, reverse=reverse):
                        masks[n, :, :, f] = (out[0][0] > 0.0).cpu().numpy()
                model.reset_state(state)
                del state
    elif args.worker == "oracle":
        frames = frames_from_sam_input(SamInput(args.size)(torch.from_numpy(volume)[None]))
        with autocast:
            logits = video_predictor_logits(model, prompts, (h, w), frames=frames, start="object")
        masks = (logits > 0).permute(0, 2, 3, 1).numpy()
        # ours' logits on the same weights, for the logit-level comparison (not measured)
        twin = build_sam2_model("sam2.1_hiera_t", args.checkpoint, image_size=args.size, device=device)
        twin.load_state_dict(model.state_dict())
        ours_logits = segmenter(twin).propagate(source, prompts, output_dtype=torch.float16)
        np.save(Path(args.result).with_suffix(".ours_logits.npy"), ours_logits.numpy())
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu0
    peak_heap = heap_peak.stop()
    result = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "encoder_seconds": encoder_clock.seconds,
        "encoder_calls": encoder_clock.calls,
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_build_mb": rss_built,
        "peak_heap_in_use_mb": peak_heap,
        "heap_in_use_after_build_mb": heap_built,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "allocator": _allocator(),
    }
    _save_masks(Path(args.result).with_suffix(".npz"), masks)
    if logits is not None:  # for the logit-level comparison with the oracle
        np.save(Path(args.result).with_suffix(".logits.npy"), logits.half().numpy())
    Path(args.result).write_text(json.dumps(result))


def run_worker(kind: str, size: int, folder: Path, opts: argparse.Namespace, repeat: int = 0) -> dict:
    result = folder / f"{kind}_{size}_{repeat}.json"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--size",
        str(size),
        "--data",
        str(folder),
        "--result",
        str(result),
        "--device",
        opts.device,
        "--seed",
        str(opts.seed),
        "--tmp",
        str(folder),
        "--encoder-batch-size",
        str(opts.encoder_batch_size),
    ]
    if opts.checkpoint:
        cmd += ["--checkpoint", opts.checkpoint]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    if opts.malloc_library:
        cmd += ["--malloc-library", opts.malloc_library]
        env["LD_PRELOAD"] = opts.malloc_library
    logger.info("running %s at %d px ...", kind, size)
    subprocess.run(cmd, check=True, env=env)
    out = json.loads(result.read_text())
    out["masks"] = _load_masks(result.with_suffix(".npz"))
    logits_path = result.with_suffix(".logits.npy")
    out["logits"] = np.load(logits_path) if logits_path.exists() else None
    ours_logits_path = result.with_suffix(".ours_logits.npy")
    out["ours_logits"] = np.load(ours_logits_path) if ours_logits_path.exists() else None
    logger.info(
        "%s at %d px: %.1f s (%.0f CPU s, load %s), peak RSS %.0f MB%s",
        kind,
        size,
        out["seconds"],
        out["cpu_seconds"],
        out["load_average_before_after"],
        out["peak_rss_mb"],
        f", CUDA peak {out['cuda_peak_mb']:.0f} MB" if out["cuda_peak_mb"] else "",
    )
    return out


# ------------------------------------------------------------------------------------ report
def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def compare(ours: dict, other: dict) -> dict:
    """Per-object IoU of the masks (logit > 0): over the volume and the worst slice.

    With logits on both sides (ours and the oracle) also the IoU at the other side's per-slice
    median logit (random weights put most pixels above 0, so this one is the sensitive test)
    and the largest logit difference.
    """
    a, b = ours["masks"], other["masks"]
    vol = [_iou(a[n], b[n]) for n in range(len(a))]
    worst = min(_iou(a[n, ..., k], b[n, ..., k]) for n in range(len(a)) for k in range(a.shape[-1]))
    res = {
        "iou_per_object": [round(v, 4) for v in vol],
        "iou_min": round(min(vol), 4),
        "slice_iou_min": round(worst, 4),
    }
    if ours.get("logits") is not None and other.get("logits") is not None:
        la, lb = ours["logits"].astype(np.float32), other["logits"].astype(np.float32)  # (N, T, H, W)
        med = np.median(lb.reshape(*lb.shape[:2], -1), axis=-1)[..., None, None]
        res["median_iou_min"] = round(min(_iou(la[n] > med[n], lb[n] > med[n]) for n in range(len(la))), 4)
        res["max_abs_logit_diff"] = float(np.abs(la - lb).max())
    return res


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def merge_entries(old: list[dict], new: list[dict]) -> list[dict]:
    """Earlier runs updated by new ones: one entry per device type, allocator, image size, volume."""

    def setting(e: dict) -> tuple:
        return e["device_type"], e.get("allocator", "glibc"), e["image_size"], tuple(e["volume_shape"])

    merged = {setting(e): e for e in old}
    merged.update({setting(e): e for e in new})
    return sorted(merged.values(), key=lambda e: (*setting(e)[:2], tuple(e["volume_shape"]), e["image_size"]))


def update_results_md(path: Path, entries: list[dict]) -> None:
    """Rewrite the table between the markers of the inference section (other sections untouched)."""
    rows = [
        "| device | image size | volume | organs | ours (s) | MONAI Label way (s) | speedup | "
        "our peak / its peak (RSS) | (CUDA) | RSS increase ours / its (MB) | "
        "heap in use, increase ours / its (MB) | "
        "IoU vs SAM2VideoPredictor (min; at 0 / at its median) | command |",
        "|---" * 13 + "|",
    ]
    for e in entries:
        cuda = f"{e['memory_ratio_cuda']:.2f}" if e.get("memory_ratio_cuda") is not None else "-"
        o = e.get("oracle")
        oracle = f"{o['iou_min']:.4f} / {o.get('median_iou_min', float('nan')):.4f}" if o else "not run"
        heap = (
            f"{e['ours']['heap_increase_mb']:.0f} / {e['baseline']['heap_increase_mb']:.0f} "
            f"({e['memory_ratio_heap_increase']:.2f})"
            if e.get("memory_ratio_heap_increase") is not None
            else "-"
        )
        allocator = e.get("allocator", "glibc")
        device = e["device"] if allocator == "glibc" else f"{e['device']}, {allocator}"
        rows.append(
            f"| {device} | {e['image_size']} | {'x'.join(map(str, e['volume_shape']))} | "
            f"{len(e['organs'])} | "
            f"{e['ours']['seconds']:.1f} | {e['baseline']['seconds']:.1f} | {e['speedup']:.2f} | "
            f"{e['memory_ratio']:.2f} | {cuda} | "
            f"{e['ours']['rss_increase_mb']:.0f} / {e['baseline']['rss_increase_mb']:.0f} "
            f"({e['memory_ratio_rss_increase']:.2f}) | {heap} | {oracle} | "
            f"`{e['command']}` |"
        )
    block = "\n".join([MARK_BEGIN, *rows, MARK_END])
    text = path.read_text() if path.exists() else "# Results\n"
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    else:
        intro = (
            f"\n{SECTION}\n\nSeconds per volume and peak memory of promptable SAM2 inference "
            "(`scripts/benchmark_inference.py`; details and caveats in its docstring). Random "
            "weights (no checkpoint can be downloaded here): the timings and memory are what they "
            "would be with the official ones; the masks only show that both sides compute the same.\n\n"
        )
        text = text.rstrip("\n") + "\n" + intro + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small CPU run: 128x128x16 volume, 256 px")
    p.add_argument("--image-sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 96], metavar=("X", "Y", "Z"))
    p.add_argument(
        "--spacing", type=float, nargs=3, default=None, help="mm; default keeps a 205x205x240 mm FOV"
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--encoder-batch-size",
        type=int,
        default=None,
        help="default 8 on CUDA, 1 on CPU (little gain there, ~170 MB more per slice at 512 px)",
    )
    p.add_argument(
        "--checkpoint", default=None, help="official sam2.1_hiera_tiny.pt (default: random weights)"
    )
    p.add_argument("--no-oracle", action="store_true", help="skip the SAM2VideoPredictor-on-tensors run")
    p.add_argument(
        "--malloc-library",
        help="preload this C allocator in both sides' processes (CPU), e.g. "
        "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4; recorded as its own row",
    )
    p.add_argument("--repeats", type=int, default=1, help="alternate ours/baseline runs; the fastest counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "results_inference.json")
    p.add_argument("--results-md", type=Path, default=ROOT / "docs" / "results.md")
    # internal: one measured run in a fresh process
    p.add_argument("--worker", choices=["ours", "baseline", "oracle"], help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.worker:
        logging.getLogger().setLevel(logging.WARNING)
        return worker(args)

    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.encoder_batch_size is None:
        args.encoder_batch_size = 8 if args.device.startswith("cuda") else 1
    if args.quick:
        args.shape, args.image_sizes = [128, 128, 16], [256]
    shape = tuple(args.shape)
    spacing = tuple(args.spacing) if args.spacing else (205.0 / shape[0], 205.0 / shape[1], 240.0 / shape[2])
    command = "python scripts/benchmark_inference.py " + " ".join(sys.argv[1:])

    entries = []
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        folder = Path(tmp)
        case = make_case(shape, spacing, args.seed, folder)
        logger.info("phantom %s, key slice %d, organs %s", shape, case["key_slice"], case["organs"])
        for size in args.image_sizes:
            # ours and the baseline alternate, --repeats times; the fastest run of each counts
            # (on a shared machine the others' load changes during a run)
            tries: dict[str, list[dict]] = {"ours": [], "baseline": []}
            for rep in range(args.repeats):
                for kind in ("ours", "baseline"):
                    tries[kind].append(run_worker(kind, size, folder, args, rep))
            runs = {k: min(v, key=lambda r: r["seconds"]) for k, v in tries.items()}
            if not args.no_oracle:
                runs["oracle"] = run_worker("oracle", size, folder, args)
            ours, base = runs["ours"], runs["baseline"]
            for r in runs.values():
                r["rss_increase_mb"] = r["peak_rss_mb"] - r["rss_after_build_mb"]
                if r.get("peak_heap_in_use_mb") is not None:
                    r["heap_increase_mb"] = r["peak_heap_in_use_mb"] - r["heap_in_use_after_build_mb"]
            all_seconds = {k: [round(r["seconds"], 1) for r in v] for k, v in tries.items()}
            entry = {
                "device": device_name(args.device),
                "device_type": "cuda" if args.device.startswith("cuda") else "cpu",
                "allocator": ours["allocator"],
                "image_size": size,
                "volume_shape": list(shape),
                "spacing_mm": [round(s, 4) for s in spacing],
                "organs": case["organs"],
                "key_slice": case["key_slice"],
                "encoder_batch_size": args.encoder_batch_size,
                "weights": args.checkpoint or "random (seeded)",
                "speedup": base["seconds"] / ours["seconds"],
                "memory_ratio": ours["peak_rss_mb"] / base["peak_rss_mb"],
                "memory_ratio_rss_increase": ours["rss_increase_mb"] / base["rss_increase_mb"],
                "memory_ratio_heap_increase": ours["heap_increase_mb"] / base["heap_increase_mb"]
                if "heap_increase_mb" in ours and "heap_increase_mb" in base
                else None,
                "memory_ratio_cuda": (ours["cuda_peak_mb"] / base["cuda_peak_mb"])
                if ours["cuda_peak_mb"]
                else None,
                **{
                    k: {m: v for m, v in r.items() if m not in ("masks", "logits", "ours_logits")}
                    for k, r in runs.items()
                },
                "seconds_of_every_repeat": all_seconds,
                "masks_vs_jpeg_baseline": compare(ours, base),
                "oracle": compare({**ours, "logits": runs["oracle"]["ours_logits"]}, runs["oracle"])
                if "oracle" in runs
                else None,
                "command": command,
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                "torch": torch.__version__,
            }
            logger.info(
                "%d px: speedup %.2fx, memory ratio %.2f (RSS) / %.2f (RSS increase) / %s (heap in use "
                "increase), oracle %s",
                size,
                entry["speedup"],
                entry["memory_ratio"],
                entry["memory_ratio_rss_increase"],
                "n/a" if entry["memory_ratio_heap_increase"] is None else f"{entry['memory_ratio_heap_increase']:.2f}",
                entry["oracle"],
            )
            entries.append(entry)

    old = json.loads(args.json.read_text()).get("entries", []) if args.json.exists() else []
    ordered = merge_entries(old, entries)
    doc = {
        "description": "scripts/benchmark_inference.py: ours vs MONAI Label's SAM2 way (see its docstring)",
        "entries": ordered,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp_json = args.json.with_name(f".{args.json.name}.tmp")
    tmp_json.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp_json, args.json)
    update_results_md(args.results_md, ordered)
    logger.info("wrote %s and %s", args.json, args.results_md)


if __name__ == "__main__":
    main()
