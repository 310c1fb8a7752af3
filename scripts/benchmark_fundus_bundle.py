"""What the fundus optic disc / cup bundle reaches: its training run, then its evaluation.

Runs the bundle's own ``train.yaml`` (then ``evaluate.yaml``) through MONAI's ConfigWorkflow in a
fresh ``bundle_root`` (so nothing is resumed), on the bundle's default data unless told
otherwise, and records the wall time of each epoch, the validation metrics after each epoch and
the final evaluation table (optic disc / cup Dice and IoU, vertical cup-to-disc ratio error):

    python scripts/benchmark_fundus_bundle.py      # the default run (SAM2.1 hiera-t, 256 px, random init)
    python scripts/benchmark_fundus_bundle.py --override epochs=20 learning_rates="{'mask_decoder': 1e-4}"

Adds the run to docs/results_fundus.json (one run per command line; rerunning a command replaces
its run) and writes the "Fundus optic disc / cup bundle" section of docs/results.md, one row per
run. Without a checkpoint the model is randomly initialised: the figures say what the demo
reaches on synthetic photographs, not what SAM does on real eyes.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "sam2_fundus_optic_disc_cup"
CONFIGS = BUNDLE / "configs"
SECTION = "Fundus optic disc / cup bundle"


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run(overrides: dict, bundle_root: Path) -> dict:
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    settings = {"bundle_root": str(bundle_root), **overrides}
    train = ConfigWorkflow(
        config_file=str(CONFIGS / "train.yaml"),
        workflow_type="train",
        logging_file=str(CONFIGS / "logging.conf"),
        **settings,
    )
    train.initialize()
    epochs: list[dict] = []
    trainer, evaluator = train.trainer, train.evaluator
    trainer.add_event_handler(
        Events.EPOCH_STARTED, lambda e: epochs.append({"epoch": e.state.epoch, "start": time.perf_counter()})
    )

    def done(e) -> None:
        row = epochs[-1]
        row["seconds"] = round(time.perf_counter() - row.pop("start"), 1)
        row.update({k: round(float(v), 4) for k, v in evaluator.state.metrics.items()})

    trainer.add_event_handler(Events.EPOCH_COMPLETED, done)
    t0 = time.perf_counter()
    train.run()
    train_s = time.perf_counter() - t0
    parser = train.parser
    setup = {
        k: parser.get_parsed_content(k)
        for k in (
            "model_family",
            "model_size",
            "checkpoint",
            "image_size",
            "epochs",
            "batch_size",
            "num_images",
            "fundus_size",
            "roi_scale",
            "learning_rates",
        )
    }
    n_train, n_val = (len(s) for s in parser.get_parsed_content("split"))
    dataset_dir = parser.get_parsed_content("dataset_dir")
    train.finalize()

    ev = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")],
        workflow_type="eval",
        logging_file=str(CONFIGS / "logging.conf"),
        **settings,
    )
    ev.initialize()
    ev.run()
    with open(bundle_root / "eval" / "metrics_summary.csv", newline="") as f:
        summary = [{k: _value(v) for k, v in r.items()} for r in csv.DictReader(f)]
    ev.finalize()
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else (f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})")
    )
    return {
        "benchmark": "fundus bundle",
        "device": device,
        "load_average_at_start": os.getloadavg(),
        "setup": {
            **{k: (str(v) if k == "checkpoint" else v) for k, v in setup.items()},
            "train_photographs": n_train,
            "validation_photographs": n_val,
            "dataset_dir": str(dataset_dir),
        },
        "overrides": overrides,
        "train_seconds": round(train_s, 1),
        "epochs": epochs,
        "evaluation": summary,
    }


def _row(result: dict) -> str:
    s, ev = result["setup"], result["evaluation"][0]
    best = max(result["epochs"], key=lambda r: r.get("val_mean_dice", -1))
    later = [r["seconds"] for r in result["epochs"][1:]] or [float("nan")]
    return (
        f"| `{result['command']}` | {s['model_size']} {s['image_size']} px, "
        f"{s['checkpoint'] or 'random init'}, lr {s['learning_rates']}, {s['epochs']} epochs | "
        f"{result['device']} (load {result['load_average_at_start'][0]:.1f} at start) | "
        f"{result['train_seconds'] / 60:.1f} min | {result['epochs'][0]['seconds']:.0f} s | "
        f"{sum(later) / len(later):.0f} s | "
        f"{best.get('val_mean_dice', float('nan')):.3f} ({best['epoch']}) | "
        f"{ev['dice_disc']:.3f} | {ev['iou_disc']:.3f} | {ev['dice_cup']:.3f} | {ev['iou_cup']:.3f} | "
        f"{ev['vcdr_abs_error']:.3f} | {ev['vcdr_failures']} |"
    )


def write_section(runs: list[dict], path: Path) -> None:
    """Replace this benchmark's section of docs/results.md (between its marker comments)."""
    begin, end = f"<!-- begin: {SECTION} -->", f"<!-- end: {SECTION} -->"
    s = runs[0]["setup"]
    lines = [
        begin,
        f"## {SECTION}",
        "",
        "`python scripts/benchmark_fundus_bundle.py [--override KEY=VALUE ...]` runs the bundle's training "
        "(`bundles/sam2_fundus_optic_disc_cup/configs/train.yaml`, the default command's settings unless "
        "overridden) then its evaluation in a fresh folder, and records each epoch (details in the script's "
        f"docstring). Data: {s['train_photographs']} training / {s['validation_photographs']} validation "
        f"synthetic photographs of {s['fundus_size']} px, cropped to {s['roi_scale']} x the disc. The table "
        "is the evaluation of the best model on the validation photographs with oracle prompts (one exact "
        "box per region from the reference label); vCDR MAE is the mean absolute error of the vertical "
        "cup-to-disc ratio, 'vCDR n/a' the photographs without a predicted disc. Random weights (no "
        "checkpoint can be downloaded here): the figures show that the pipeline trains end to end, not what "
        "SAM does on real eyes. Wall times are on a CPU shared with other jobs (the 1-minute load "
        "average when the run started is given; it moved during the runs).",
        "",
        "| command | model | device | train wall time | epoch 1 (encoder + cache fill) "
        "| later epochs (cached) | best val mean Dice (epoch) | Dice disc | IoU disc | Dice cup | IoU cup "
        "| vCDR MAE | vCDR n/a |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(r) for r in runs]
    lines.append(end)
    text = path.read_text() if path.exists() else "# Results\n"
    if begin in text:
        text = text[: text.index(begin)] + "\n".join(lines) + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--override", nargs="*", default=[], help="bundle overrides KEY=VALUE (Python literals)")
    p.add_argument("--bundle-root", type=Path, default=None, help="default: a fresh temporary folder")
    p.add_argument(
        "--dataset-dir",
        type=Path,
        default=BUNDLE / "data" / "fundus_synthetic",
        help="the bundle's default data (generated when absent)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results_fundus.json")
    p.add_argument("--no-docs", action="store_true", help="do not touch docs/results.md")
    args = p.parse_args()
    overrides = {"dataset_dir": str(args.dataset_dir)}
    for item in args.override:
        key, _, value = item.partition("=")
        overrides[key] = _value(value)
    command = "python scripts/benchmark_fundus_bundle.py" + "".join(
        f" --override {k}={v}" if v.replace("_", "").replace(".", "").isalnum() else f' --override {k}="{v}"'
        for k, _, v in (o.partition("=") for o in args.override)
    )
    with tempfile.TemporaryDirectory(prefix="fundus-bench-") as tmp:
        result = {"command": command, **run(overrides, args.bundle_root or Path(tmp))}
    print(json.dumps(result, indent=2))
    # one run per command: a new run of the same command replaces the old one
    runs = json.loads(args.out.read_text()).get("runs", []) if args.out.exists() else []
    runs = [r for r in runs if r.get("command") != command] + [result]
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps({"benchmark": "fundus bundle", "runs": runs}, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    if not args.no_docs:
        write_section(runs, ROOT / "docs" / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
