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
        help="volume size in voxels (default depends on --kind, e.g. 256 256 64 for ct)",
    )
    p.add_argument("--dicom", action="store_true", help="also write each image as a DICOM series")
    p.set_defaults(func=_run_make_phantoms)


def _run_make_phantoms(args: argparse.Namespace) -> int:
    from monai_sam.data.phantom import write_phantom_dataset

    dataset_json = write_phantom_dataset(
        kind=args.kind,
        num_cases=args.cases,
        out_dir=args.out,
        seed=args.seed,
        shape=tuple(args.shape) if args.shape else None,
        dicom=args.dicom,
    )
    logger.info("wrote %d %s phantom(s): %s", args.cases, args.kind, dataset_json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monai-sam", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_make_phantoms(sub)
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
