"""`monai-sam` command line: the jobs a bundle is awkward for.

Each sub-command lives in a small `_add_<name>` / `_run_<name>` pair so that new jobs
(segment, convert, ...) are added without touching the others.
"""

from __future__ import annotations

import argparse
import functools
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
        help="convert a downloaded public dataset (BTCV, MSD, ACDC, REFUGE, LiTS) to the Decathlon layout",
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
        help="segment CT/MR volumes (NIfTI, DICOM folders, PACS studies) from prompts with SAM2's memory",
        description="Segment every case of --input (a NIfTI file, a DICOM series, or a folder tree of "
        "studies) or of a PACS (--dicomweb URL --study UID) and write OUTPUT/<case>_seg.nii.gz (object ids, "
        "the input's orientation and affine), with --dicom-seg a DICOM-SEG <case>_seg.dcm referencing the "
        "source series, and <case>_seg.json. Cases already done are skipped; a failed case is listed and the "
        "others go on. "
        "Exit status: 0 all cases done or skipped, 2 a case failed or the run could not start. "
        "See docs/dicom_pipeline.md.",
    )
    src = p.add_argument_group("input")
    src.add_argument("--input", type=Path, default=None,
                     help="NIfTI file, DICOM series folder, or a folder tree of DICOM studies / NIfTI files")
    src.add_argument("--dicomweb", default=None, metavar="URL",
                     help="DICOMweb root of a PACS (e.g. http://localhost:8042/dicom-web); credentials from "
                     "MONAI_SAM_DICOMWEB_TOKEN or MONAI_SAM_DICOMWEB_USER/_PASSWORD")
    src.add_argument("--study", action="append", default=[], metavar="UID",
                     help="StudyInstanceUID to pull from --dicomweb (repeat for several)")
    src.add_argument("--dicomweb-attempts", type=int, default=3,
                     help="tries per DICOMweb request (refused connections, HTTP 429/503/504; "
                     "back-off 1, 2, 4 s...)")
    src.add_argument("--series-uid", default=None, help="segment this series (when a study holds several)")
    src.add_argument("--min-slices", type=int, default=8,
                     help="fewest slices of a usable series (localizers have fewer)")
    how = p.add_argument_group("model and prompts")
    how.add_argument("--bundle", type=Path, default=None,
                     help="a trained bundle folder (configs/ + models/model.pt), "
                     "e.g. bundles/sam2_ct_abdominal_organs")
    how.add_argument("--prompts", type=Path, default=None,
                     help="prompt file (one case) or folder of <case>.json prompt files "
                     "(docs/prompt_file.md)")
    how.add_argument("--auto", action="store_true",
                     help="no prompt file: the bundle's automatic prompter (its inference.yaml "
                     "'auto_prompter'), or a prompt-free bundle's own inference")
    how.add_argument("--checkpoint", type=Path, default=None,
                     help="official SAM2/SAM2.1 .pt: without --bundle the model itself; with --bundle "
                     "the frozen encoder the bundle was trained on (none: refused unless --demo)")
    how.add_argument("--demo", action="store_true",
                     help="allow random weights (no checkpoint): every output then says 'demo' "
                     "(record, NIfTI description, SEG series description and content label)")
    how.add_argument("--model-size", default="sam2.1_hiera_t",
                     help="without --bundle: sam2.1_hiera_t|s|b+|l, sam2_hiera_*")
    how.add_argument("--image-size", type=int, default=1024,
                     help="without --bundle: SAM2 input size in pixels (1024 = official)")
    how.add_argument("--window", default="auto",
                     help="without --bundle: 'auto' (CT window or MR percentiles), 'mr', 'none', "
                     "a CT preset...")
    how.add_argument("--stop-after-absent", type=int, default=None, metavar="K",
                     help="end each direction of propagation after K slices on which SAM2 calls the "
                     "object absent; nothing beyond is labelled (default: propagate to the volume's ends)")
    out = p.add_argument_group("output")
    out.add_argument("--output", type=Path, required=True, help="output folder")
    out.add_argument("--dicom-seg", action="store_true", help="also write a DICOM-SEG for DICOM inputs")
    out.add_argument("--no-store", action="store_true",
                     help="with --dicomweb: do not store the SEG back (STOW-RS)")
    out.add_argument("--store-demo", action="store_true",
                     help="with --dicomweb and --demo: store the demo SEG to the PACS too (never by default)")
    out.add_argument("--overwrite", action="store_true", help="redo cases already done")
    run = p.add_argument_group("running")
    run.add_argument("--device", default="auto",
                     help="auto (under torchrun: cuda:LOCAL_RANK), cpu, cuda, cuda:1 ...")
    run.add_argument("--precision", default="auto",
                     help="without --bundle: auto (bf16 on CUDA), float32, bfloat16")
    run.add_argument("--encoder-batch-size", type=int, default=8,
                     help="without --bundle: slices per encoder call")
    p.set_defaults(func=_run_segment)


def _segment_cases(args: argparse.Namespace, modalities: tuple[str, ...]):
    from monai_sam.pipeline import PipelineError, dicomweb_cases, discover_cases

    if (args.input is None) == (args.dicomweb is None):
        raise PipelineError("give --input PATH or --dicomweb URL --study UID (one of them)")
    if args.dicomweb is not None:
        if not args.study:
            raise PipelineError("--dicomweb needs at least one --study UID")
        if not args.dicom_seg and not args.no_store:
            logger.info("--dicomweb: writing a DICOM-SEG to store back (as with --dicom-seg)")
            args.dicom_seg = True
        return dicomweb_cases(args.dicomweb, args.study)
    if args.study:
        raise PipelineError("--study goes with --dicomweb")
    return discover_cases(
        args.input, modalities=modalities, min_slices=args.min_slices, series_uid=args.series_uid
    )


def _bundle_modalities(bundle: Path | None) -> tuple[str, ...]:
    """The image modality a bundle declares in its metadata (CT and MR when it says nothing)."""
    import json

    if bundle is None:
        return ("CT", "MR")
    try:
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())
        modality = meta["network_data_format"]["inputs"]["image"]["modality"]
        return (str(modality).upper(),)
    except (OSError, ValueError, KeyError, TypeError):
        return ("CT", "MR")


def _run_segment(args: argparse.Namespace) -> int:
    from monai_sam.bundle import (
        BundleError,
        bundle_parser,
        load_bundle_model,
        load_checkpoint_model,
        output_naming,
        require_bundle_weights,
    )
    from monai_sam.demo import DemoWeightsError, require_weights
    from monai_sam.pipeline import PipelineError, rank_and_world, resolve_device, run_pipeline

    # highdicom's INFO lines (one per copied module) would drown the per-case log
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    try:
        if args.auto and args.prompts is not None:
            raise PipelineError("give --prompts or --auto, not both")
        if not args.auto and args.prompts is None:
            raise PipelineError("give --prompts (a prompt file or a folder of <case>.json) or --auto")
        if args.auto and args.bundle is None:
            raise PipelineError(
                "--auto needs --bundle: a bundle whose inference.yaml defines 'auto_prompter' "
                "(or a prompt-free bundle)"
            )
        rank, world, local_rank = rank_and_world()
        device = resolve_device(args.device, local_rank)
        window = None if str(args.window).lower() == "none" else args.window
        if args.stop_after_absent is not None and args.stop_after_absent < 1:
            raise PipelineError(f"--stop-after-absent must be >= 1, got {args.stop_after_absent}")

        def factory():
            if args.bundle is not None:
                model = load_bundle_model(
                    args.bundle, args.checkpoint, device=device, need_auto=args.auto, demo=args.demo
                )
            else:
                model = load_checkpoint_model(
                    args.checkpoint, args.model_size, args.image_size, window, device, args.precision,
                    args.encoder_batch_size, demo=args.demo,
                )
            if args.stop_after_absent is not None and hasattr(model.network, "stop_after_absent"):
                model.network.stop_after_absent = args.stop_after_absent
            return model

        factory = functools.cache(factory)  # built once, and only when a case needs it
        # fail fast, before any case: a bundle that cannot serve, random weights not asked for
        naming = None
        if args.bundle is not None:
            parser = bundle_parser(args.bundle, need_auto=args.auto)
            if parser.get("prompt_free") and not args.auto:
                raise PipelineError(f"bundle {args.bundle} is prompt-free: use --auto, not --prompts")
            if args.checkpoint is not None:
                parser["checkpoint"] = str(args.checkpoint)
            require_bundle_weights(parser, args.bundle, args.demo)
            naming = output_naming(parser)
        else:
            require_weights(args.checkpoint, args.demo, "monai-sam segment")
        modalities = _bundle_modalities(args.bundle)
        cases = _segment_cases(args, modalities)
        dicomweb = None
        if args.dicomweb is not None:
            from monai_sam.io.dicomweb import DicomWebSource

            dicomweb = DicomWebSource.from_env(args.dicomweb, attempts=args.dicomweb_attempts)
        summary = run_pipeline(
            cases, factory, args.output, prompts=args.prompts, auto=args.auto, dicom_seg=args.dicom_seg,
            overwrite=args.overwrite, dicomweb=dicomweb, store=not args.no_store, min_slices=args.min_slices,
            modalities=modalities, rank=rank, world_size=world, store_demo=args.store_demo, naming=naming,
        )
    except (PipelineError, BundleError, DemoWeightsError, FileNotFoundError, ValueError) as err:
        logger.error("segment: %s", err)  # the message names the file, study or bundle and what is wrong
        return 2
    return 2 if summary["counts"]["failed"] else 0


def build_parser() -> argparse.ArgumentParser:
    from monai_sam import __version__

    parser = argparse.ArgumentParser(prog="monai-sam", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"monai-sam {__version__}")
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
