"""Every bundle's CacheDataset caches its deterministic steps: loaded, windowed tensors, not paths.

MONAI caches the transforms before the first ``Randomizable`` one; a nested ``Compose`` counts
as random (MONAI issue 7130), so the bundles share flat lists, and the oracle prompt transforms
are not ``Randomizable``.
"""

from pathlib import Path

import pytest
import test_bundle_autosam_cardiac as cardiac
import test_bundle_ct_organs as organs
import test_bundle_fundus as fundus
import test_bundle_liver_tumor as liver
import torch
from monai.bundle import ConfigWorkflow
from monai.transforms import Randomizable

from monai_sam.transforms import LesionPromptsd, PromptFromLabeld, RegionPromptd

pytestmark = pytest.mark.slow

BUNDLES = {
    "sam2_ct_abdominal_organs": (organs.TRAIN, organs.tiny),
    "sam2_ct_liver_tumor": (liver.TRAIN, liver.tiny),
    "autosam_mri_cardiac": (cardiac.TRAIN, cardiac.tiny),
    "sam2_fundus_optic_disc_cup": (fundus.TRAIN, fundus.tiny),
}


def test_oracle_prompt_transforms_are_not_random():
    for cls in (PromptFromLabeld, LesionPromptsd, RegionPromptd):
        assert not issubclass(cls, Randomizable), cls


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_cached_items_hold_loaded_tensors(tmp_path: Path, name: str):
    config, tiny = BUNDLES[name]
    wf = ConfigWorkflow(config_file=config, workflow_type="train", **tiny(tmp_path / "b", tmp_path / "d"))
    wf.initialize()
    for split in ("train", "validate"):
        dataset = wf.parser.get_parsed_content(f"{split}#dataset")
        item = dataset._cache[0]
        assert isinstance(item, dict), f"{name} {split}: cached {type(item).__name__}, not a loaded item"
        assert isinstance(item["image"], torch.Tensor), f"{name} {split}: image cached as {item['image']!r}"
        assert isinstance(item["label"], torch.Tensor), f"{name} {split}: label cached as {item['label']!r}"
        # the windowed / scaled image, not the raw file's intensities
        assert float(item["image"].min()) >= -3.0 and float(item["image"].max()) <= 3.0
    validate = wf.parser.get_parsed_content("validate#dataset")
    if name != "autosam_mri_cardiac":  # the prompt-free head's validation has no prompts
        assert "prompts" in validate._cache[0], f"{name}: the oracle prompts are cached with the volume"
