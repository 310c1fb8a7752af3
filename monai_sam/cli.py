"""`monai-sam` command line: the jobs a bundle is awkward for.

Each sub-command lives in a small `_add_<name>` / `_run_<name>` pair so that new jobs
(segment, convert, ...) are added without touching the others.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("monai_sam")


def _add_make_phantoms(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-phantoms",
        help="write the embedded default dataset: synthetic CT / MR / cardiac MR phantoms",
        description="Generate synthetic phantoms (NIfTI images + labels, dataset.json, optional DICOM series).",
    )
    p.add_argument("--kind", choices=["ct", "mr", "cardiac-mr"], default="ct")
    p.add_argument("--cases", type=int, default=8, help="number of volumes")
    p.add_argument("--out", type=Path, required=True, help="output dataset folder")
    p.add_argument("--seed", type=int, default=0, help="case i uses seed + i; same seed, same voxels")
    p.add_argument(
        "--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
        help="volume size in voxels (default depends on --kind, e.g. 256 256 64 for ct); without --spacing "
        "the default field of view is kept, so a smaller shape means coarser voxels, not a cropped body",
    )
    p.add_argument(
        "--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), default=None,
        help="voxel size in mm (default depends on --kind, e.g. 0.8 0.8 2.5 for ct)",
    )
    p.add_argument("--dicom", action="store_true", help="also write each image as a DICOM series")
    p.set_defaults(func=_run_make_phantoms)


def _run_make_phantoms(args: argparse.Namespace) -> int:
    from monai_sam.data.phantom import DEFAULT_SHAPES, DEFAULT_SPACINGS, write_phantom_dataset

    spacing = tuple(args.spacing) if args.spacing else None
    if args.shape and spacing is None:
        fov = [n * s for n, s in zip(DEFAULT_SHAPES[args.kind], DEFAULT_SPACINGS[args.kind])]
        spacing = tuple(round(f / n, 4) for f, n in zip(fov, args.shape))
    dataset_json = write_phantom_dataset(
        kind=args.kind,
        num_cases=args.cases,
        out_dir=args.out,
        seed=args.seed,
        shape=tuple(args.shape) if args.shape else None,
        spacing=spacing,
        dicom=args.dicom,
    )
    logger.info("wrote %d %s phantom(s): %s", args.cases, args.kind, dataset_json)
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    from monai_sam.data.converters import CONVERTERS

    p = sub.add_parser(
        "convert",
        help="convert a downloaded public dataset (BTCV, MSD, ACDC, REFUGE) to the Decathlon layout",
        description="Write imagesTr/, labelsTr/ and dataset.json from a public dataset's own layout.",
    )
    p.add_argument("dataset", choices=sorted(CONVERTERS))
    p.add_argument("--src", type=Path, required=True, help="the dataset folder as downloaded")
    p.add_argument("--out", type=Path, required=True, help="output folder (Decathlon layout)")
    p.add_argument("--copy", action="store_true", help="copy files instead of symlinking them")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from monai_sam.data.converters import CONVERTERS

    dataset_json = CONVERTERS[args.dataset](args.src, args.out, link=not args.copy)
    logger.info("converted %s: %s", args.dataset, dataset_json)
    return 0


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment a CT/MR volume from prompts on key slices with SAM2's slice memory",
        description="Segment the objects of a prompt file (docs/prompt_file.md) in one volume and write "
        "OUTPUT/<case>_seg.nii.gz (object ids, the input's orientation and affine).",
    )
    p.add_argument("--input", type=Path, required=True, help="NIfTI file or DICOM series folder")
    p.add_argument("--prompts", type=Path, required=True, help="prompt file (JSON, see docs/prompt_file.md)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="official SAM2/SAM2.1 .pt of --model-size (none: random weights, a demo only)")
    p.add_argument("--output", type=Path, required=True, help="output folder")
    p.add_argument("--model-size", default="sam2.1_hiera_t", help="sam2.1_hiera_t|s|b+|l, sam2_hiera_*")
    p.add_argument("--image-size", type=int, default=1024, help="SAM2 input size in pixels (1024 = official)")
    p.add_argument("--window", default="auto",
                   help="'auto' (CT window or MR percentiles), 'mr', 'none', a CT preset: abdomen, liver...")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA), float32, bfloat16, float16")
    p.add_argument("--encoder-batch-size", type=int, default=8, help="slices per image-encoder call")
    p.set_defaults(func=_run_segment)


def _run_segment(args: argparse.Namespace) -> int:
    from monai_sam.networks import CheckpointError
    from monai_sam.prompts import PromptError
    from monai_sam.segment import segment_to_file

    try:
        out = segment_to_file(
            args.input,
            args.prompts,
            args.output,
            checkpoint=args.checkpoint,
            model_size=args.model_size,
            image_size=args.image_size,
            window=None if str(args.window).lower() == "none" else args.window,
            device=args.device,
            precision=args.precision,
            encoder_batch_size=args.encoder_batch_size,
            progress=True,
        )
    except (CheckpointError, PromptError, FileNotFoundError, ValueError) as err:
        logger.error("segment: %s", err)  # the message names the file and what is wrong
        return 2
    logger.info("segmentation written to %s", out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monai-sam", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_make_phantoms(sub)
    _add_convert(sub)
    _add_segment(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
