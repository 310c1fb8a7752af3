"""Few-shot benchmark: Dice per class vs number of labeled volumes, prompt-free heads vs a UNet from scratch.

The protocol of Hu, Xu, Shi (arXiv:2306.13731): a frozen SAM2 encoder with a light prompt-free
head (AutoSAM, CNN, linear) against MONAI's ``UNet`` trained from scratch, all with the same
labeled data and the same number of epochs (hence optimizer steps), on

(a) the cardiac MR phantom (ACDC labels: RV, myocardium, LV): ``--train-volumes`` phantoms
    form the labeled pool (budgets 1, 2, 4, all take its first n), ``--test-volumes`` other
    phantoms are the test set; Dice is 3D per test volume, averaged over volumes;
(b) the real CT in ``../shared/data/totalseg_ct`` (liver, spleen, kidneys, stomach; labels by
    TotalSegmentator): one patient, so its 30 axial slices are cut into slabs of ``--ct-slab``
    consecutive slices; odd slabs are the test set, even slabs the labeled pool, used from the
    middle of the volume outwards ("1 labeled volume" = one slab). Dice is 3D over the stacked
    test slices. Skipped with a message when the folder is absent.

Every method sees the same ``[0, 1]`` slices resized to ``--image-size`` (the encoder input;
the UNet gets the grey slice at that size) and is scored at the volume's own grid. Without
``--checkpoint`` the SAM2 encoder is randomly initialised: the heads then learn on random
features, which measures the pipeline and the heads' capacity, not SAM's pretraining.

    python scripts/benchmark_few_shot.py --quick          # the CPU run recorded in docs/results.md
    python scripts/benchmark_few_shot.py --checkpoint checkpoints/sam2.1_hiera_tiny.pt --image-size 1024

Writes docs/results_few_shot.json, docs/few_shot_dice.png and the "Few-shot prompt-free heads"
section of docs/results.md.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monai_sam.evaluation.metrics import nanmean, score_case  # noqa: E402
from monai_sam.networks import HEADS, PromptFreeSamSegmenter, build_model  # noqa: E402
from monai_sam.transforms import CTWindow, MRPercentileScale, SamInput  # noqa: E402

SECTION = "Few-shot prompt-free heads"
METHODS = (*HEADS, "unet")
CT_DIR = ROOT.parent / "shared" / "data" / "totalseg_ct"
CT_ORGANS = {5: "liver", 1: "spleen", 2: "kidney_right", 3: "kidney_left", 6: "stomach"}
CARDIAC = {1: "right_ventricle", 2: "myocardium", 3: "left_ventricle"}
logger = logging.getLogger("benchmark_few_shot")


@dataclass
class Unit:
    """One labeled (or test) unit: a volume, or a slab of slices. ``image`` in [0, 1], (H, W, Z)."""

    name: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # per slice, (Z, ...)
    frames: torch.Tensor | None = None  # (Z, 1, S, S) grey slices at the model input size


@dataclass
class Dataset:
    name: str
    classes: dict[int, str]
    pool: list[Unit]
    test: list[Unit]
    budgets: list[int]
    budget_unit: str
    note: str


def cardiac_dataset(train_volumes: int, test_volumes: int, shape, budgets) -> Dataset:
    from monai_sam.data import make_phantom

    scale = MRPercentileScale()
    units = []
    for i in range(train_volumes + test_volumes):
        # the default field of view (288 x 288 x 96 mm) at the requested number of voxels
        spacing = (288.0 / shape[0], 288.0 / shape[1], 96.0 / shape[2])
        ph = make_phantom("cardiac-mr", 1000 + i, shape=shape, spacing=spacing)
        img = np.asarray(scale(torch.as_tensor(ph.image[None], dtype=torch.float32)))[0]
        units.append(Unit(f"phantom_cardiac_mr_{1000 + i}", img, ph.label.astype(np.int64), spacing))
    return Dataset(
        "cardiac MR phantom",
        dict(CARDIAC),
        units[:train_volumes],
        units[train_volumes:],
        sorted({b for b in budgets if b < train_volumes} | {train_volumes}),
        "volumes",
        f"{train_volumes} labeled-pool phantoms, {test_volumes} test phantoms, {tuple(shape)} voxels",
    )


def ct_dataset(slab: int, budgets) -> Dataset | None:
    from monai_sam.data import load_volume

    if not (CT_DIR / "ct.nii.gz").exists():
        logger.warning("real CT not found at %s: part (b) skipped", CT_DIR)
        return None
    ct = load_volume(CT_DIR / "ct.nii.gz")
    seg = load_volume(CT_DIR / "seg.nii.gz")
    img = np.asarray(CTWindow("abdomen")(ct.as_tensor()))[0]
    lab = np.rint(np.asarray(seg.as_tensor())[0]).astype(np.int64)
    lab[~np.isin(lab, list(CT_ORGANS))] = 0  # other TotalSegmentator classes count as background
    spacing = tuple(float(s) for s in ct.meta["spacing"])
    depth = img.shape[-1]
    slabs = [list(range(z, min(z + slab, depth))) for z in range(0, depth, slab)]
    test_idx = [z for k, s in enumerate(slabs) if k % 2 == 1 for z in s]
    pool_slabs = [s for k, s in enumerate(slabs) if k % 2 == 0]
    centre = depth / 2
    pool_slabs.sort(key=lambda s: abs(np.mean(s) - centre))  # middle of the volume first
    pool = [Unit(f"slices {s[0]}-{s[-1]}", img[..., s], lab[..., s], spacing) for s in pool_slabs]
    test = [Unit(f"test slices ({len(test_idx)})", img[..., test_idx], lab[..., test_idx], spacing)]
    return Dataset(
        "real CT (TotalSegmentator example)",
        dict(CT_ORGANS),
        pool,
        test,
        sorted({b for b in budgets if b < len(pool)} | {len(pool)}),
        f"slabs of {slab} slices",
        f"one patient, 30 axial slices at 3 mm: even {slab}-slice slabs are the labeled pool "
        f"(middle first), odd slabs ({len(test_idx)} slices) the test set",
    )


def prepare(units: list[Unit], seg: PromptFreeSamSegmenter, image_size: int, device) -> None:
    """Encode every slice once (the frozen encoder is the costly part); keep the grey frames for the UNet."""
    to_sam = SamInput(image_size)
    for u in units:
        frames = torch.as_tensor(np.asarray(to_sam(torch.as_tensor(u.image[None], dtype=torch.float32))))
        frames = frames.permute(3, 0, 1, 2).contiguous()  # (Z, 3, S, S)
        with torch.no_grad():
            raw = seg.encode(frames.to(device))
        u.features = {k: v.cpu() for k, v in raw.items()}
        grey = F.interpolate(
            torch.as_tensor(u.image, dtype=torch.float32).permute(2, 0, 1)[:, None],
            size=(image_size, image_size),
            mode="bilinear",
            align_corners=False,
        )
        u.frames = grey


def make_model(method: str, sam, classes: list[int], device):
    if method == "unet":
        from monai.networks.nets import UNet

        return UNet(
            2, 1, len(classes) + 1, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2
        ).to(device)
    return PromptFreeSamSegmenter(sam, method, classes).to(device)


def logits(model, method: str, units_slices, idx, out_hw, device):
    feats, frames = units_slices
    if method == "unet":
        out = model(frames[idx].to(device))
        return F.interpolate(out, size=out_hw, mode="bilinear", align_corners=False)
    return model(None, features={k: feats[k][idx].to(device) for k in model.feature_keys}, output_size=out_hw)


def classes_of(label: np.ndarray, classes: list[int]) -> torch.Tensor:
    lookup = np.zeros(max(classes) + 1, dtype=np.int64)
    lookup[classes] = np.arange(1, len(classes) + 1)
    lab = np.where(label <= max(classes), label, 0)
    return torch.as_tensor(lookup[lab])


def train_and_test(
    method: str, sam, ds: Dataset, budget: int, epochs: int, batch: int, lr: float, seed: int, device
) -> dict:
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    classes = list(ds.classes)
    model = make_model(method, sam, classes, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    units = ds.pool[:budget]
    feats = {k: torch.cat([u.features[k] for u in units]) for k in units[0].features}
    frames = torch.cat([u.frames for u in units])
    target = torch.cat([classes_of(u.label, classes).permute(2, 0, 1) for u in units])[
        :, None
    ]  # (N, 1, H, W)
    hw = tuple(target.shape[-2:])
    n = target.shape[0]
    gen = torch.Generator().manual_seed(seed)
    steps, t0 = 0, time.time()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            loss = loss_fn(logits(model, method, (feats, frames), idx, hw, device), target[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    train_s = time.time() - t0
    model.eval()
    per_class: dict[str, list[float]] = {name: [] for name in ds.classes.values()}
    with torch.no_grad():
        for u in ds.test:
            z = u.label.shape[-1]
            pred = []
            for start in range(0, z, batch):
                idx = torch.arange(start, min(start + batch, z))
                out = logits(model, method, (u.features, u.frames), idx, tuple(u.label.shape[:2]), device)
                pred.append(out.argmax(1).cpu())
            cls = torch.cat(pred).permute(1, 2, 0).numpy()  # (H, W, Z) class indices
            ids = np.asarray([0, *classes])[cls]
            for s in score_case(ids, u.label, u.spacing, ds.classes, case=u.name):
                per_class[s.name].append(s.dice)
    dice = {k: nanmean(v) for k, v in per_class.items()}
    return {
        "method": method,
        "budget": budget,
        "dice": dice,
        "mean_dice": nanmean(list(dice.values())),
        "train_slices": int(n),
        "steps": steps,
        "train_s": round(train_s, 1),
        "trainable_params": int(sum(p.numel() for p in params)),
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [r for r in results["datasets"] if r["runs"]]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4.2), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        budgets = sorted({r["budget"] for r in part["runs"]})
        for method in METHODS:
            runs = sorted((r for r in part["runs"] if r["method"] == method), key=lambda r: r["budget"])
            if runs:
                ax.plot(
                    [r["budget"] for r in runs],
                    [r["mean_dice"] for r in runs],
                    marker="o",
                    label="UNet from scratch" if method == "unet" else f"frozen SAM2 + {method} head",
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) if b != budgets[-1] else f"all ({b})" for b in budgets])
        ax.set_xlabel(f"labeled {part['budget_unit']}")
        ax.set_ylabel("mean Dice over classes (test)")
        ax.set_ylim(0, 1)
        ax.set_title(part["name"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    enc = results["settings"]["encoder"]
    fig.suptitle(
        f"Few-shot Dice vs labeled data ({enc}, {results['settings']['image_size']} px, "
        f"{results['settings']['epochs']} epochs)",
        fontsize=10,
    )
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
    os.replace(tmp, path)


def write_section(results: dict, path: Path, png: Path, json_path: Path) -> None:
    """Replace this benchmark's section of docs/results.md (between its marker comments)."""
    s = results["settings"]
    begin, end = f"<!-- begin: {SECTION} -->", f"<!-- end: {SECTION} -->"
    lines = [
        begin,
        f"## {SECTION}",
        "",
        "Dice per class on held-out data vs the number of labeled volumes, for a frozen SAM2 encoder "
        "with each prompt-free head and for MONAI's `UNet` trained from scratch, all with the same "
        f"labeled slices and the same {s['epochs']} epochs (batch {s['batch_size']}, AdamW lr {s['lr']}, "
        f"DiceCE loss), at {s['image_size']} px. Encoder: {s['encoder']}. Command: `{s['command']}` "
        f"({s['device']}, {s['total_minutes']:.1f} min). Data in `{json_path.name}`, plot "
        f"`{png.name}`.",
        "",
    ]
    if "random" in s["encoder"]:
        lines += [
            "**Random-init encoder** (no official SAM2 weights can be downloaded here): the heads learn on "
            "random features, so these figures test the pipeline and compare the heads' capacity on "
            "such features; they say nothing about SAM's pretraining. Rerun with `--checkpoint` for that.",
            "",
        ]
    lines += [
        "How to read it: one seed; every method gets the same epochs and learning rate, so a small "
        f"budget means few optimizer steps (with 1 labeled cardiac volume, {s['epochs']} steps of "
        f"{s['batch_size']} slices). "
        "A Dice of 0 for a class means the model predicted none of it on the test data (an under-trained "
        "head predicting background), not a wrong location. The per-class Dice are 3D, on the test "
        "volumes (cardiac: averaged over volumes; CT: over the stacked test slices).",
        "",
    ]
    for part in results["datasets"]:
        lines.append(f"### {part['name']}")
        lines.append("")
        if not part["runs"]:
            lines += [f"Skipped: {part['note']}", ""]
            continue
        lines += [f"{part['note']}. Budget unit: {part['budget_unit']}.", ""]
        names = list(part["classes"].values())
        lines.append("| method | labeled | train slices | " + " | ".join(names) + " | mean | train s |")
        lines.append("|---|---|---|" + "---|" * len(names) + "---|---|")
        for r in sorted(part["runs"], key=lambda r: (METHODS.index(r["method"]), r["budget"])):
            cells = " | ".join(f"{r['dice'][n]:.3f}" for n in names)
            lines.append(
                f"| {r['method']} | {r['budget']} | {r['train_slices']} | {cells} | "
                f"**{r['mean_dice']:.3f}** | {r['train_s']} |"
            )
        lines.append("")
    lines.append(f"![few-shot Dice]({png.name})")
    lines.append(end)
    text = path.read_text() if path.exists() else "# Results\n"
    if begin in text:
        text = text[: text.index(begin)] + "\n".join(lines) + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    write_atomic(path, text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="small run for a shared CPU (about 20 min on 2 cores)"
    )
    p.add_argument("--model-size", default="sam2.1_hiera_t")
    p.add_argument(
        "--checkpoint", default=None, help="official SAM2 checkpoint (default: random init / demo)"
    )
    p.add_argument("--image-size", type=int, default=None, help="encoder input px (default 256, quick 128)")
    p.add_argument("--epochs", type=int, default=None, help="epochs for every method (default 60, quick 15)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--budgets", type=int, nargs="+", default=[1, 2, 4], help="labeled volumes, 'all' is added"
    )
    p.add_argument(
        "--train-volumes", type=int, default=None, help="cardiac labeled pool (default 8, quick 4)"
    )
    p.add_argument(
        "--test-volumes", type=int, default=None, help="cardiac test phantoms (default 4, quick 2)"
    )
    p.add_argument(
        "--cardiac-shape",
        type=int,
        nargs=3,
        default=None,
        help="phantom voxels (default 192 192 12, quick 96 96 8)",
    )
    p.add_argument("--ct-slab", type=int, default=3, help="slices per CT slab")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results_few_shot.json")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "few_shot_dice.png")
    p.add_argument("--results-md", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument("--from-json", action="store_true", help="only redraw the plot and table from --out")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.from_json:
        results = json.loads(args.out.read_text())
        plot(results, args.plot)
        write_section(results, args.results_md, args.plot, args.out)
        return 0
    q = args.quick
    image_size = args.image_size or (128 if q else 256)
    epochs = args.epochs or (15 if q else 60)
    train_volumes = args.train_volumes or (4 if q else 8)
    test_volumes = args.test_volumes or (2 if q else 4)
    shape = tuple(args.cardiac_shape or ((96, 96, 8) if q else (192, 192, 12)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.time()
    torch.manual_seed(args.seed)
    sam = build_model(args.model_size, args.checkpoint, image_size, device)
    weights = f"from {Path(args.checkpoint).name}" if args.checkpoint else "random init / demo"
    encoder = f"{args.model_size} {weights}"
    # one segmenter encodes every level any head reads (AutoSAM's high-resolution ones included)
    encoder_seg = PromptFreeSamSegmenter(sam, "autosam", [1]).to(device).eval()

    datasets = [cardiac_dataset(train_volumes, test_volumes, shape, args.budgets)]
    ct = ct_dataset(args.ct_slab, args.budgets)
    results = {"benchmark": "few_shot", "datasets": []}
    for ds in [*datasets, ct]:
        if ds is None:
            results["datasets"].append(
                {
                    "name": "real CT (TotalSegmentator example)",
                    "classes": CT_ORGANS,
                    "budget_unit": "slabs",
                    "note": f"{CT_DIR} is absent",
                    "runs": [],
                }
            )
            continue
        t0 = time.time()
        prepare(ds.pool + ds.test, encoder_seg, image_size, device)
        logger.info(
            "%s: encoded %d slices in %.0f s",
            ds.name,
            sum(u.label.shape[-1] for u in ds.pool + ds.test),
            time.time() - t0,
        )
        runs = []
        for method in args.methods:
            for budget in ds.budgets:
                r = train_and_test(
                    method, sam, ds, budget, epochs, args.batch_size, args.lr, args.seed, device
                )
                logger.info(
                    "%s | %s | %d %s: mean Dice %.3f %s (%d steps, %.0f s)",
                    ds.name,
                    method,
                    budget,
                    ds.budget_unit,
                    r["mean_dice"],
                    {k: round(v, 3) for k, v in r["dice"].items()},
                    r["steps"],
                    r["train_s"],
                )
                runs.append(r)
        results["datasets"].append(
            {
                "name": ds.name,
                "classes": ds.classes,
                "budget_unit": ds.budget_unit,
                "note": ds.note,
                "budgets": ds.budgets,
                "runs": runs,
            }
        )
    cmd = "python scripts/benchmark_few_shot.py" + " ".join([""] + sys.argv[1:])
    results["settings"] = {
        "encoder": encoder,
        "image_size": image_size,
        "epochs": epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "command": cmd.strip(),
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})",
        "total_minutes": (time.time() - t_start) / 60,
    }
    write_atomic(args.out, json.dumps(results, indent=2, default=str) + "\n")
    plot(results, args.plot)
    write_section(results, args.results_md, args.plot, args.out)
    logger.info("wrote %s, %s and the %r section of %s", args.out, args.plot, SECTION, args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
