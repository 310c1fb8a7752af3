"""Each bundle's large_files.yml names the official checkpoint its encoder expects, as MONAI reads it."""

from pathlib import Path

import pytest

from monai_sam.networks.builders import MODEL_SIZES

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p for p in (REPO / "bundles").iterdir() if (p / "configs").is_dir())


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_download_large_files_fetches_the_official_checkpoint(bundle: Path, monkeypatch):
    import monai.bundle.scripts as scripts
    import yaml

    asked = []
    monkeypatch.setattr(scripts, "download_url", lambda **kw: asked.append(kw))  # no network here
    scripts.download_large_files(bundle_path=str(bundle))
    assert asked, f"{bundle.name}: large_files.yml lists nothing"
    by_url = {spec.url: spec for spec in MODEL_SIZES.values()}
    for kw in asked:
        spec = by_url.get(kw["url"])
        assert spec is not None, f"{bundle.name}: {kw['url']} is not an official checkpoint URL"
        assert Path(kw["filepath"]) == bundle / "models" / spec.checkpoint_file
        assert kw.get("hash_val") == spec.md5  # the published MD5, or none (SAM2: none published)
    train = yaml.safe_load((bundle / "configs" / "train.yaml").read_text())
    default = str(train["model_size"])
    names = {by_url[kw["url"]].name for kw in asked}
    assert default in names or default.startswith("$"), f"{bundle.name}: its default {default} is not listed"
