#!/usr/bin/env python
"""Download official SAM2 / SAM2.1 / SAM checkpoints (for machines with internet access).

    python scripts/download_checkpoints.py --list
    python scripts/download_checkpoints.py sam2.1_hiera_t sam_vit_b --out models/

Every file is downloaded to a temporary name, checked, then renamed, so an interrupted
download never looks like a checkpoint. Checks: the published MD5 where one exists (SAM v1 files
carry its first 6 digits in their names); for every file, that it loads with
``torch.load(weights_only=True)`` and that its tensors have the signature of the size asked for
(`monai_sam.networks.checkpoint_model_size`). The SHA-256 of each file is printed so that it can
be recorded; Meta does not publish checksums for the SAM2 files.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monai_sam.networks.builders import (  # noqa: E402  (after the sys.path line above)
    MODEL_SIZES,
    canonical_model_size,
    checkpoint_model_size,
    read_state_dict,
)

logger = logging.getLogger("download_checkpoints")


def _digests(path: Path) -> tuple[str, str]:
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
            sha.update(block)
    return md5.hexdigest(), sha.hexdigest()


def download(name: str, out_dir: Path, force: bool = False) -> Path:
    spec = MODEL_SIZES[canonical_model_size(name)]
    target = out_dir / spec.checkpoint_file
    if target.exists() and not force:
        logger.info("%s already present: %s (use --force to download again)", spec.name, target)
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.part")
    logger.info("downloading %s from %s", spec.name, spec.url)
    try:
        with urllib.request.urlopen(spec.url, timeout=60) as response, open(partial, "wb") as f:
            shutil.copyfileobj(response, f, length=1 << 20)
        md5, sha256 = _digests(partial)
        if spec.md5 is not None and md5 != spec.md5:
            raise RuntimeError(f"{spec.url}: MD5 {md5} does not match the published {spec.md5}")
        found = checkpoint_model_size(read_state_dict(partial))
        if found != spec.name:
            raise RuntimeError(f"{spec.url}: the file looks like {found}, not {spec.name}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("%s -> %s (md5 %s, sha256 %s)", spec.name, target, md5, sha256)
    return target


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="sizes to download, e.g. sam2.1_hiera_t sam_vit_b")
    p.add_argument("--out", type=Path, default=ROOT / "models", help="folder for the files (git-ignored)")
    p.add_argument("--list", action="store_true", help="list sizes, files, URLs and checksums")
    p.add_argument("--force", action="store_true", help="download again even if the file exists")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.list or not args.names:
        for spec in MODEL_SIZES.values():
            print(f"{spec.name:18s} {spec.checkpoint_file:28s} {spec.url}  md5={spec.md5 or 'not published'}")
        return 0
    for name in args.names:
        download(name, args.out, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
