"""What one memory object per lesion costs: seconds per volume against the number of lesions.

The liver tumour bundle (bundles/sam2_ct_liver_tumor) tracks the liver and every lesion as its
own object, each prompted on its own largest slice, so each lesion is one more propagation
through the volume. This measures, on CT phantoms asked for 1, 3 and 6 tumours (same anatomy,
seed 0): the encoder over all slices (once: what the feature cache saves on later runs), the
memory propagation of the liver + each lesion from oracle boxes, and the lesion-level
evaluation of the result (``match_lesions``: components, matching, diameters):

    python scripts/benchmark_liver_tumor.py                      # hiera-t, 256 px, 128 x 128 x 32
    python scripts/benchmark_liver_tumor.py --image-size 1024 --shape 256 256 64 --spacing 0.8 0.8 2.5

Random-init weights (no checkpoint can be downloaded here): timings do not depend on them, the
masks are not meaningful, so no accuracy is reported. Writes docs/results_liver_tumor.json and
the "Liver tumour bundle (per-lesion objects)" section of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monai_sam.data import make_phantom  # noqa: E402
from monai_sam.engines.trainer import encoder_features  # noqa: E402
from monai_sam.evaluation.lesions import match_lesions  # noqa: E402
from monai_sam.inferers import logits_to_label  # noqa: E402
from monai_sam.networks import Sam2VolumeSegmenter, build_sam2_model  # noqa: E402
from monai_sam.transforms import CTWindow, LesionPromptsd, SamInput, lesion_instances, merge_lesions  # noqa: E402

SECTION = "Liver tumour bundle (per-lesion objects)"


def case(num_tumors: int, shape, spacing) -> tuple[torch.Tensor, np.ndarray, list]:
    """Windowed image ``(1, X, Y, Z)``, class map (1 liver, 2 tumour) and oracle per-lesion prompts."""
    ph = make_phantom("ct", 0, tuple(shape), tuple(spacing), num_tumors=num_tumors)
    classes = np.select([ph.label == 6, ph.label == 1], [2, 1], 0)
    objects, _ = lesion_instances(classes, 2, spacing)
    prompts = LesionPromptsd(key_slices="largest", mode_probs={"box": 1.0})(
        {"label": objects[None]}
    )["prompts"]
    image = CTWindow("liver")(torch.as_tensor(ph.image[None]))
    return image, classes, prompts


def measure(seg: Sam2VolumeSegmenter, image_size: int, num_tumors: int, shape, spacing) -> dict:
    image, classes, prompts = case(num_tumors, shape, spacing)
    frames = SamInput(image_size)(image).as_tensor().permute(3, 0, 1, 2)
    hw = tuple(classes.shape[:2])
    t0 = time.perf_counter()
    features = encoder_features(seg, frames, seg.device)
    t1 = time.perf_counter()
    logits = seg.propagate(None, prompts, original_size=hw, output_size=hw, features=features)
    t2 = time.perf_counter()
    objects = logits_to_label(logits.permute(0, 2, 3, 1), [p.object_id for p in prompts]).numpy()
    pred = merge_lesions(objects, 2)
    t3 = time.perf_counter()
    m = match_lesions(pred, classes, spacing, label=2, case=f"tumours_{num_tumors}")
    t4 = time.perf_counter()
    lesions = sum(p.object_id >= 100 for p in prompts)
    return {
        "tumours_asked": num_tumors, "lesions": lesions, "objects": len(prompts),
        "key_slices": len({p.key_slices[0] for p in prompts}),
        "encode_s": t1 - t0, "propagate_s": t2 - t1, "propagate_s_per_object": (t2 - t1) / len(prompts),
        "lesion_eval_s": t4 - t3, "predicted_components": m.summary.num_pred,
    }


def write_section(rows: list[dict], setup: dict, path: Path) -> None:
    """Replace this benchmark's section of docs/results.md (between its marker comments), atomically."""
    begin, end = f"<!-- begin: {SECTION} -->", f"<!-- end: {SECTION} -->"
    lines = [begin, f"## {SECTION}", "",
             "Seconds per volume of the liver tumour bundle's memory propagation with one object per "
             "lesion (the liver + each lesion, oracle boxes on each object's largest slice), against "
             "the number of lesions; the encoder runs once per volume (the feature cache's part) and "
             "the lesion-level evaluation (`match_lesions`) once on the result. Random-init "
             f"{setup['model_size']} at {setup['image_size']} px on {setup['device']}, phantom "
             f"{'x'.join(map(str, setup['shape']))} voxels at {'x'.join(map(str, setup['spacing']))} mm "
             "(timings do not depend on the weights; no accuracy is reported). Command: "
             f"`{setup['command']}`." + (f" {setup['note']}" if setup.get("note") else ""), "",
             "| lesions | objects | distinct key slices | encoder (all slices) s | propagation s "
             "| s per object | lesion evaluation s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['lesions']} | {r['objects']} | {r['key_slices']} | {r['encode_s']:.1f} | "
                     f"{r['propagate_s']:.1f} | {r['propagate_s_per_object']:.1f} | "
                     f"{r['lesion_eval_s']:.2f} |")
    lines += ["", "Propagation grows by one pass through the volume per lesion (on CPU objects run one "
              "at a time whatever their key slices; on CUDA, objects sharing key slices are batched), so a "
              "volume with many lesions costs lesions x a single organ's propagation; the encoder's "
              "share does not grow.", end]
    text = path.read_text() if path.exists() else "# Results\n"
    if begin in text:
        text = text[: text.index(begin)] + "\n".join(lines) + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".md", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", default="sam2.1_hiera_t")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--shape", type=int, nargs=3, default=[128, 128, 32])
    p.add_argument("--spacing", type=float, nargs=3, default=[1.6, 1.6, 5.0])
    p.add_argument("--tumours", type=int, nargs="+", default=[1, 3, 6])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results_liver_tumor.json")
    p.add_argument("--no-results-md", action="store_true", help="do not touch docs/results.md")
    p.add_argument("--note", default="", help="a sentence for docs/results.md (e.g. the machine's load)")
    p.add_argument("--from-json", type=Path, help="only rewrite the docs/results.md section from this JSON")
    args = p.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        setup = {**saved["setup"], "note": args.note or saved["setup"].get("note", "")}
        write_section(saved["rows"], setup, ROOT / "docs" / "results.md")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    seg = Sam2VolumeSegmenter(build_sam2_model(args.model_size, image_size=args.image_size, device=device))
    seg.eval()
    setup = {
        "model_size": args.model_size, "image_size": args.image_size,
        "shape": args.shape, "spacing": args.spacing,
        "device": torch.cuda.get_device_name() if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads, {platform.machine()})",
        "command": "python scripts/benchmark_liver_tumor.py" + "".join(
            f" {a}" for a in sys.argv[1:] if a != "--no-results-md"),
        "note": args.note,
    }
    rows = []
    with torch.inference_mode():
        for n in args.tumours:
            row = measure(seg, args.image_size, n, args.shape, args.spacing)
            print(json.dumps(row))
            rows.append(row)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": "liver_tumor_per_lesion_objects", "setup": setup, "rows": rows},
                              indent=2) + "\n")
    os.replace(tmp, args.out)
    if not args.no_results_md:
        write_section(rows, setup, ROOT / "docs" / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
