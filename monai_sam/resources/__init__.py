"""Data files shipped inside the package, and where the default bundle is.

The label maps (``label_maps/<name>.yaml``) and the SNOMED-CT segment codes
(``snomed_segments.yaml``) are package data, read through `importlib.resources`, so they are found
the same way from a checkout, an editable install and an installed wheel. The bundles are not
package data: they stay at the top-level ``bundles/`` of a source checkout, where
``python -m monai.bundle`` runs them.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["DEFAULT_BUNDLE_NAME", "default_bundle", "resource"]

#: The bundle the MONAI Label app serves when ``--conf bundle`` is not given.
DEFAULT_BUNDLE_NAME = "sam2_ct_abdominal_organs"


def resource(*parts: str) -> Traversable:
    """A file or folder of ``monai_sam/resources`` (``resource("label_maps", "btcv.yaml")``)."""
    return files(__name__).joinpath(*parts)


def default_bundle() -> Path:
    """``bundles/sam2_ct_abdominal_organs`` of the source checkout this package is imported from.

    Raises:
        FileNotFoundError: the package is not imported from a checkout (an installed wheel has no
            bundles next to it), or the checkout lacks the bundle.
    """
    package = Path(__file__).resolve().parent.parent  # .../monai_sam
    bundle = package.parent / "bundles" / DEFAULT_BUNDLE_NAME
    if not (bundle / "configs" / "inference.yaml").is_file():
        raise FileNotFoundError(
            f"no default bundle: {bundle / 'configs' / 'inference.yaml'} does not exist. The bundles are "
            f"only in a source checkout of monai-sam, and monai_sam is imported from {package}; pass "
            "--conf bundle /path/to/bundle (or --conf bundle none for no bundle)"
        )
    return bundle
