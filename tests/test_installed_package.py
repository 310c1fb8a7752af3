"""The package works installed non-editable, from a folder outside the checkout.

The checkout's editable install hides missing package data (files read relative to the
repository), so the package is built and installed into a temporary target, and the CLI is run
from another temporary folder with only that target on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import pytest

REPO = Path(__file__).resolve().parents[1]
SHAPE = ("48", "48", "8")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package built from the checkout's sources and installed (not editable) into a temp target."""
    src = tmp_path_factory.mktemp("src")  # build outside the checkout: no build/ or egg-info left there
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "monai_sam", src / "monai_sam", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path_factory.mktemp("target")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--quiet", "--target", str(target), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"pip install --target failed:\n{done.stdout}\n{done.stderr}"
    assert (target / "monai_sam" / "resources" / "label_maps" / "phantom_ct.yaml").is_file()
    assert (target / "monai_sam" / "resources" / "snomed_segments.yaml").is_file()
    return target


def _run(args: list[str], target: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}"
    return done


@pytest.mark.slow
def test_installed_package_runs_outside_the_checkout(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    check = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        import monai_sam
        from monai_sam.data import load_label_map
        from monai_sam.data.datalist import list_label_maps
        from monai_sam.io.dicom_seg import segment_code
        from monai_sam.resources import default_bundle

        repo, target = Path({str(REPO)!r}), Path({str(installed)!r})
        assert Path(monai_sam.__file__).resolve().is_relative_to(target), monai_sam.__file__
        on_path = [p for p in sys.path if p and Path(p).resolve().is_relative_to(repo)]
        assert not on_path, on_path
        try:
            default_bundle()
        except FileNotFoundError as err:
            bundle_error = str(err)
        else:
            raise AssertionError("default_bundle() found a bundle next to an installed package")
        print(json.dumps({{
            "phantom_ct": load_label_map("phantom_ct"), "maps": list_label_maps(),
            "liver": segment_code("liver").type.meaning, "bundle_error": bundle_error,
        }}))
    """)
    found = json.loads(_run(["-c", check], installed, work).stdout.strip().splitlines()[-1])
    assert found["phantom_ct"]["1"] == "liver" and "btcv" in found["maps"]
    assert found["liver"] == "Liver"  # the packaged SNOMED-CT table
    assert "--conf bundle" in found["bundle_error"] and "source checkout" in found["bundle_error"]

    _run(["-m", "monai_sam.cli", "make-phantoms", "--kind", "ct", "--cases", "1", "--out", "phantoms",
          "--shape", *SHAPE], installed, work)
    image = work / "phantoms" / "imagesTr" / "phantom_ct_000.nii.gz"
    prompts = work / "phantoms" / "prompts" / "phantom_ct_000.json"
    assert image.is_file() and prompts.is_file() and (work / "phantoms" / "dataset.json").is_file()

    _run(["-m", "monai_sam.cli", "segment", "--input", str(image), "--prompts", str(prompts), "--demo",
          "--model-size", "sam2.1_hiera_t", "--image-size", "128", "--device", "cpu",
          "--encoder-batch-size", "4", "--output", "out"], installed, work)
    written = sorted((work / "out").glob("phantom_ct_000_seg*.nii.gz"))
    assert written, f"no segmentation in {work / 'out'}: {sorted(p.name for p in (work / 'out').iterdir())}"
    assert nib.load(str(written[0])).shape == tuple(int(n) for n in SHAPE)


def test_default_bundle_is_the_checkouts():
    from monai_sam.resources import default_bundle

    assert default_bundle() == REPO / "bundles" / "sam2_ct_abdominal_organs"
