#!/usr/bin/env python
"""Interaction efficiency on the CT phantoms: a box and corrective clicks, and the early stop.

Part 1, the CVPR 2025 interactive challenge's protocol (`monai_sam.evaluation.interaction`):
per organ, a box on its middle slice, then up to ``--clicks`` corrective clicks, each on the
largest error left; Dice and NSD (2 mm) after each interaction, DSC/NSD AUC, seconds per
interaction. Run two ways on the same volumes and the same weights:

- ``monai-sam``: `Sam2VolumeSegmenter`, the volume encoded once and kept; each interaction
  propagates both directions from every prompted slice.
- ``monailabel-sam_3d``: MONAI Label 0.8.5's ``Sam2InferTask(dimension=3)``, called as its
  server calls it: one request per interaction carrying every click so far (``foreground`` /
  ``background`` as ``[i, j, k]``) and the box as its ``roi`` (``[i0, j0, i1, j1, k, k + 1]``),
  ``reset_state`` on each organ's first request. It writes every slice as a JPEG once, then
  re-encodes the frames on each request and propagates forward only, from the earliest prompted
  slice; its own intensity handling (``LoadImaged``, the values as they are) is kept.

Part 2, propagation that stops where the organ ends: per organ, the box alone, propagated with
``stop_after_absent`` off and at each ``--stop-after`` K, and by sam2's ``SAM2VideoPredictor``
(same weights and decoder settings; it always runs to the volume's ends): the false-positive
volume on slices outside the organ's true slice range, Dice, and the seconds spent propagating.

Weights: random (seed ``--seed``, a demo: the figures are the pipeline's, not a model's), an
official checkpoint (``--checkpoint sam2.1_hiera_tiny.pt --image-size 1024``), or a trained
bundle (``--bundle bundles/sam2_ct_abdominal_organs``, e.g. after the README's main job). The
built-in gets the very same weights, exported to the official file format.

Writes ``<output-dir>/interaction_{steps,summary}.csv`` and ``interaction_curves.png``,
``docs/results_interaction.json`` (runs merged by weights) and the tables between the markers
of docs/results.md.

    python scripts/benchmark_interaction.py                     # random weights, 2 phantoms
    python scripts/benchmark_interaction.py --bundle bundles/sam2_ct_abdominal_organs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmark this checkout whatever copy of monai_sam is installed
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))  # the SAM2VideoPredictor reference (helpers_oracle)
logger = logging.getLogger("benchmark_interaction")

MARK_BEGIN = "<!-- BEGIN interaction-benchmark (scripts/benchmark_interaction.py writes this table) -->"
MARK_END = "<!-- END interaction-benchmark -->"
STOP_BEGIN = "<!-- BEGIN early-stop (scripts/benchmark_interaction.py writes this table) -->"
STOP_END = "<!-- END early-stop -->"
ORGANS = {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left", 5: "aorta"}
MERGE = {6: 1}  # liver tumors count as liver, as in the organ bundle


# ----------------------------------------------------------------------------------- inputs
def load_cases(folder: Path, opts: argparse.Namespace, window: str | None) -> list:
    """The phantoms as the model sees them (`monai_sam.evaluation.interaction.InteractionCase`)."""
    from monai_sam.data import datalist_from_decathlon
    from monai_sam.data.phantom import ensure_phantom_dataset
    from monai_sam.evaluation.interaction import load_interaction_case

    dataset = ensure_phantom_dataset(
        folder,
        "ct",
        num_cases=opts.cases,
        seed=opts.phantom_seed,
        shape=tuple(opts.shape),
        spacing=tuple(opts.spacing),
    )
    cases = [
        load_interaction_case(item, window, MERGE) for item in datalist_from_decathlon(dataset)[: opts.cases]
    ]
    for case in cases:
        affine = nib.load(case.path).affine
        if not np.allclose(affine[:3, :3], np.diag(case.spacing)):
            raise ValueError(f"{case.path}: the built-in reads the file's own array; the phantom must be RAS")
    return cases


def load_network(opts: argparse.Namespace):
    """(network, its intensity window, model size, image size, description of the weights)."""
    from monai_sam.bundle import load_bundle_model, load_checkpoint_model

    torch.manual_seed(opts.seed)
    if opts.bundle:
        from monai_sam.engines import read_model_record

        model = load_bundle_model(opts.bundle, opts.checkpoint, demo=opts.checkpoint is None)
        record = read_model_record(Path(opts.bundle) / "models")
        size, image_size = record.model_size, int(record.image_size)
        encoder = "official encoder" if opts.checkpoint else "random encoder: demo"
        weights = f"bundle {Path(opts.bundle).name} (trained parts, {encoder})"
    else:
        model = load_checkpoint_model(
            opts.checkpoint, opts.size, opts.image_size, "abdomen", demo=opts.checkpoint is None
        )
        size, image_size = opts.size, opts.image_size
        weights = Path(opts.checkpoint).name if opts.checkpoint else f"random init (seed {opts.seed}): demo"
    return model.network, model.window, size, image_size, weights


# ----------------------------------------------------------------------------------- part 1
class BuiltinSam3d:
    """One object's prompts as a MONAI Label infer request to the built-in ``sam_3d`` task."""

    def __init__(self, task, image_path: str, name: str, device: str) -> None:
        self.task, self.image_path, self.name, self.device = task, image_path, name, device
        self.first = True

    def request(self, prompts) -> dict:
        fg, bg, roi = [], [], []
        for sp in prompts.slices:
            k = sp.slice_index
            if sp.box is not None:  # x = column = j, y = row = i
                x0, y0, x1, y1 = (int(round(float(v))) for v in sp.box)
                roi = [y0, x0, y1, x1, k, k + 1]
            if sp.points is not None:
                for (x, y), positive in zip(sp.points.tolist(), sp.point_labels.tolist(), strict=True):
                    (fg if positive else bg).append([int(y), int(x), k])
        req = {"image": self.image_path, "label": self.name, "foreground": fg, "background": bg, "roi": roi}
        req.update(device=self.device, reset_state="true" if self.first else "false")
        self.first = False
        return req

    def __call__(self, prompts) -> np.ndarray:
        path, _ = self.task(self.request(prompts))
        try:
            return np.asarray(nib.load(path).dataobj) > 0
        finally:
            os.unlink(path)


def run_ours(sessions: list, cases: list, opts: argparse.Namespace) -> list:
    from monai_sam.evaluation.interaction import simulate_interactions

    steps = []
    for session, case in zip(sessions, cases, strict=True):
        for oid, name in ORGANS.items():
            if (case.labels == oid).any():
                steps += simulate_interactions(
                    session,
                    case.labels == oid,
                    case.spacing,
                    oid,
                    name,
                    case.name,
                    "monai-sam",
                    num_clicks=opts.clicks,
                )
    return steps


def run_builtin(
    network, size: str, image_size: int, cases: list[dict], opts: argparse.Namespace, tmp: Path
) -> list:
    from benchmark_label import CONFIG_NAMES, HF, export_weights

    from monai_sam.evaluation.interaction import simulate_interactions

    wdir = tmp / "builtin_model"
    wdir.mkdir()
    export_weights(network.model, wdir, size, image_size)
    pt_name, cfg_name = CONFIG_NAMES[size]
    # MONAI Label names its files after these URLs and downloads nothing when they exist
    os.environ["MONAI_SAM_MODEL_PT"] = f"{HF}/{size.replace('_', '-')}/resolve/main/{pt_name}"
    os.environ["MONAI_SAM_MODEL_CFG"] = f"{HF}/{size.replace('_', '-')}/resolve/main/{cfg_name}"
    os.environ["MONAI_LABEL_DATASTORE_CACHE_PATH"] = str(tmp / "mlcache")
    from monailabel.sam2.infer import Sam2InferTask
    from sam2.build_sam import build_sam2_video_predictor

    task = Sam2InferTask(model_dir=str(wdir), dimension=3)
    task.predictors[opts.device] = build_sam2_video_predictor(task.config_path, task.path, device=opts.device)
    steps = []
    for case in cases:
        for oid, name in ORGANS.items():
            if (case.labels == oid).any():
                segment = BuiltinSam3d(task, case.path, name, opts.device)
                steps += simulate_interactions(
                    segment,
                    case.labels == oid,
                    case.spacing,
                    oid,
                    name,
                    case.name,
                    "monailabel-sam_3d",
                    num_clicks=opts.clicks,
                )
    return steps


# ----------------------------------------------------------------------------------- part 2
def run_early_stop(
    network, size: str, image_size: int, sessions: list, cases: list, opts: argparse.Namespace
) -> list[dict]:
    from helpers_oracle import video_predictor_logits

    from monai_sam.evaluation.interaction import box_prompt, mask_scores
    from monai_sam.inferers import propagate_to_label
    from monai_sam.networks import build_sam2_video_predictor_model
    from monai_sam.networks.sam2_volume import frames_from_sam_input
    from monai_sam.prompts import ObjectPrompts
    from monai_sam.transforms import SamInput

    predictor = build_sam2_video_predictor_model(size, image_size=image_size)
    predictor.load_state_dict(network.model.state_dict())
    predictor.sam_mask_decoder.dynamic_multimask_via_stability = network.multimask_fallback
    predictor.eval()
    rows = []
    for session, case in zip(sessions, cases, strict=True):  # the encoding part 1 made, reused
        frames = frames_from_sam_input(SamInput(image_size)(case.scaled))
        voxel_ml = float(np.prod(case.spacing)) / 1000.0
        for oid, name in ORGANS.items():
            truth = case.labels == oid
            if not truth.any():
                continue
            on = np.flatnonzero(truth.any(axis=(0, 1)))
            prompts = [ObjectPrompts(oid, name, [box_prompt(truth)])]
            settings: list[tuple[str, int | None]] = [("off", None)] + [
                (f"K={k}", k) for k in opts.stop_after
            ]
            for label_, k in settings + [("SAM2VideoPredictor", -1)]:
                t0 = time.perf_counter()
                if k == -1:  # includes its per-frame encoding: it has no way to take features
                    with torch.inference_mode():
                        pred = (
                            video_predictor_logits(predictor, prompts, session.original_size, frames=frames)[
                                0
                            ]
                            > 0
                        )
                    pred = pred.permute(1, 2, 0).numpy()
                    steps = None
                else:
                    pred = (
                        propagate_to_label(
                            network,
                            None,
                            prompts,
                            features=session.features,
                            original_size=session.original_size,
                            output_size=session.original_size,
                            stop_after_absent=k,
                        ).numpy()
                        > 0
                    )
                    steps = network.last_frame_steps
                seconds = time.perf_counter() - t0
                outside = pred.copy()
                outside[..., on[0] : on[-1] + 1] = False
                dice, _ = mask_scores(pred, truth, case.spacing)
                rows.append(
                    {
                        "case": case.name,
                        "organ": name,
                        "setting": label_,
                        "dice": dice,
                        "fp_beyond_ml": float(outside.sum()) * voxel_ml,
                        "slices_beyond": int(outside.any(axis=(0, 1)).sum()),
                        "seconds": seconds,
                        "frame_steps": steps,
                        "true_slices": [int(on[0]), int(on[-1])],
                    }
                )
    return rows


# ----------------------------------------------------------------------------------- report
def by_method(summary: list[dict], steps: list) -> list[dict]:
    from monai_sam.evaluation.interaction import mean_curves
    from monai_sam.evaluation.metrics import nanmean

    curves = mean_curves(steps)
    out = []
    for method in curves:
        rows = [r for r in summary if r["method"] == method]
        out.append(
            {
                "method": method,
                "objects": len(rows),
                "dice_after_each": curves[method],
                "dsc_auc": nanmean([r["dsc_auc"] for r in rows]),
                "nsd_auc": nanmean([r["nsd_auc"] for r in rows]),
                "dice_final": nanmean([r["dice_final"] for r in rows]),
                "nsd_final": nanmean([r["nsd_final"] for r in rows]),
                "seconds_per_interaction": nanmean([r["seconds_per_interaction"] for r in rows]),
            }
        )
    return out


def stop_summary(rows: list[dict]) -> list[dict]:
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        sub = [r for r in rows if r["setting"] == setting]
        out.append(
            {
                "setting": setting,
                "objects": len(sub),
                "fp_beyond_ml": sum(r["fp_beyond_ml"] for r in sub),
                "slices_beyond": sum(r["slices_beyond"] for r in sub),
                "mean_dice": float(np.mean([r["dice"] for r in sub])),
                "seconds": sum(r["seconds"] for r in sub),
                "frame_steps": None if sub[0]["frame_steps"] is None else sum(r["frame_steps"] for r in sub),
            }
        )
    return out


def tables(runs: list[dict]) -> tuple[str, str]:
    inter = [
        "| weights | method | objects | Dice after box, then each click | DSC AUC | NSD AUC | final Dice "
        "| final NSD | s / interaction | device | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    stop = [
        "| weights | propagation | objects | false positives beyond the organ (mL) | slices labelled beyond "
        "| mean Dice | propagation s | slice steps | command |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for m in run["interaction"]:
            curve = " / ".join(f"{v:.2f}" for v in m["dice_after_each"])
            inter.append(
                f"| {run['weights']} | {m['method']} | {m['objects']} | {curve} | {m['dsc_auc']:.2f} "
                f"| {m['nsd_auc']:.2f} | {m['dice_final']:.3f} | {m['nsd_final']:.3f} "
                f"| {m['seconds_per_interaction']:.2f} | {run['device']} | `{run['command']}` |"
            )
        for s in run["early_stop"]:
            steps = "-" if s["frame_steps"] is None else str(s["frame_steps"])
            stop.append(
                f"| {run['weights']} | {s['setting']} | {s['objects']} | {s['fp_beyond_ml']:.1f} "
                f"| {s['slices_beyond']} | {s['mean_dice']:.3f} | {s['seconds']:.1f} | {steps} "
                f"| `{run['command']}` |"
            )
    return "\n".join(inter), "\n".join(stop)


def update_docs(results_md: Path, runs: list[dict]) -> None:
    from monai_sam.utils import replace_marked_block

    inter, stop = tables(runs)
    replace_marked_block(
        results_md,
        MARK_BEGIN,
        MARK_END,
        inter,
        "## Interaction efficiency (box + corrective clicks)\n\n"
        "The CVPR 2025 interactive challenge's protocol on the CT phantoms "
        "(`scripts/benchmark_interaction.py`, `monai_sam.evaluation.interaction`): per organ one box on its "
        "middle slice, then up to 5 clicks, each at the centre of the largest error left. DSC/NSD AUC: "
        "area under the Dice / NSD of the 5 clicks (at most 4), as the challenge computes it.",
    )
    replace_marked_block(
        results_md,
        STOP_BEGIN,
        STOP_END,
        stop,
        "## Early stop: propagation that ends with the organ\n\n"
        "The box alone on each organ's middle slice, propagated with `stop_after_absent` off, at K, and "
        "by `SAM2VideoPredictor` (same weights; its seconds include its per-slice encoding, ours exclude "
        "the one encoding every setting shares).",
    )


def merge_runs(path: Path, run: dict) -> list[dict]:
    runs = json.loads(path.read_text()).get("runs", []) if path.exists() else []
    runs = [r for r in runs if r["weights"] != run["weights"]] + [run]
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, help="a trained bundle (its models/ and configs/)")
    p.add_argument("--checkpoint", type=Path, help="official SAM2 weights (the base encoder with --bundle)")
    p.add_argument("--size", default="sam2.1_hiera_t")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--cases", type=int, default=2)
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 32], metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 5.0], metavar=("SX", "SY", "SZ"))
    p.add_argument("--clicks", type=int, default=5)
    p.add_argument("--stop-after", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--no-builtin", action="store_true", help="skip MONAI Label's sam_3d")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    # the organ bundle trains on phantoms 0-9: these are unseen volumes
    p.add_argument("--phantom-seed", type=int, default=1000, help="phantom i uses this seed + i")
    p.add_argument("--output-dir", type=Path, default=ROOT / "docs" / "interaction")
    p.add_argument("--output", type=Path, default=ROOT / "docs" / "results_interaction.json")
    p.add_argument("--results-md", type=Path, default=ROOT / "docs" / "results.md")
    opts = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from monai_sam.evaluation.interaction import (
        Sam2InteractiveSession,
        plot_interaction_curves,
        summarize_interactions,
        write_interaction_csvs,
    )
    from monai_sam.utils import write_text_atomic

    command = "python scripts/benchmark_interaction.py " + " ".join(sys.argv[1:])
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="benchmark_interaction_") as tmp_:
        tmp = Path(tmp_)
        network, window, size, image_size, weights = load_network(opts)
        network.to(opts.device)
        cases = load_cases(tmp / "phantoms", opts, window)
        sessions = [Sam2InteractiveSession(network, case.scaled, stop_after_absent=None) for case in cases]
        for session, case in zip(sessions, cases, strict=True):
            logger.info("%s: encoded in %.1f s", case.name, session.encode_seconds)
        steps = run_ours(sessions, cases, opts)
        early = run_early_stop(network, size, image_size, sessions, cases, opts)
        if not opts.no_builtin:  # last: it resets hydra's global configuration
            steps += run_builtin(network, size, image_size, cases, opts, tmp)
    write_interaction_csvs(steps, opts.output_dir)
    plot_interaction_curves(
        steps, opts.output_dir / "interaction_curves.png", f"{weights}, {len(cases)} phantoms"
    )
    summary = summarize_interactions(steps)
    run = {
        "weights": weights,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"{platform.machine()} {opts.device}, {torch.get_num_threads()} threads",
        "model_size": size,
        "image_size": image_size,
        "volumes": f"{opts.cases} CT phantoms {tuple(opts.shape)} voxels at {tuple(opts.spacing)} mm",
        "interaction": by_method(summary, steps),
        "early_stop": stop_summary(early),
        "early_stop_per_object": early,
        "wall_seconds": time.perf_counter() - t_start,
        "command": command.strip(),
    }
    runs = merge_runs(opts.output, run)
    doc = {
        "benchmark": "box + corrective clicks (CVPR 2025 protocol) and early stop, CT phantoms",
        "runs": runs,
    }
    write_text_atomic(opts.output, json.dumps(doc, indent=2))
    update_docs(opts.results_md, runs)
    logger.info(
        "wrote %s, %s and the tables in %s (%.0f s)",
        opts.output_dir,
        opts.output,
        opts.results_md,
        run["wall_seconds"],
    )


if __name__ == "__main__":
    main()
