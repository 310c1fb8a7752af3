"""The app's settings: ``--conf key value`` pairs of ``monailabel start_server`` over a bundle's.

``--conf`` keys (all optional):

============================  =============================================================
``bundle``                    bundle folder whose weights, labels and train workflow the app
                              uses (default: ``bundles/sam2_ct_abdominal_organs`` of the
                              source checkout the package is imported from, an error when
                              installed; ``none`` for no bundle)
``checkpoint``                official SAM2 ``.pt``: the bundle's frozen encoder, or the whole
                              model when the bundle has no trained ``models/model.pt``
``model_size``, ``image_size`` override the bundle's (official weights: ``image_size 1024``)
``window``                    intensity step: ``auto``, a CT preset (``abdomen``...), ``mr``
``labels``                    ``liver,spleen`` or JSON ``{"liver": 1}`` (default: the bundle's)
``device``                    ``auto`` (CUDA if present), ``cpu``, ``cuda:1``...
``encoder_batch_size``        slices per encoder call (default 4)
``feature_dtype``             kept encoder features: ``auto`` (bfloat16 under CUDA autocast,
                              else float32), ``float32``, ``bfloat16``, ``float16``
``feature_cache_gb``          RAM budget of the kept features (default 8)
``feature_cache_images``      most images kept (default 4)
``feature_cache_ttl_s``       drop an image's features unused this long (default 1800)
``demo``                      ``true``: serve a random-init encoder (no ``checkpoint``); without
                              it the app refuses to start, and with it every result says "demo"
============================  =============================================================
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai_sam.label.engine import LabelModelSettings
from monai_sam.resources import default_bundle

__all__ = ["KNOWN_KEYS", "settings_from_conf"]

logger = logging.getLogger(__name__)

KNOWN_KEYS = {
    "bundle",
    "checkpoint",
    "model_size",
    "image_size",
    "window",
    "labels",
    "device",
    "encoder_batch_size",
    "feature_dtype",
    "feature_cache_gb",
    "feature_cache_images",
    "feature_cache_ttl_s",
    "demo",
}
# keys MONAI Label itself puts in an app's conf
_MONAILABEL_KEYS = {"server_mode", "preload", "models", "skip_trainers", "skip_strategies", "skip_scoring"}


def _parse_labels(text: str) -> dict[int, str]:
    text = text.strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--conf labels: not valid JSON: {err}") from err
        return {int(v): str(k) for k, v in raw.items()}
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError('--conf labels: give names (liver,spleen) or JSON {"liver": 1}')
    return {i: n for i, n in enumerate(names, start=1)}


def _number(conf: Mapping[str, str], key: str, kind: type, default: Any) -> Any:
    if key not in conf or conf[key] in ("", None):
        return default
    try:
        return kind(conf[key])
    except ValueError as err:
        raise ValueError(f"--conf {key} {conf[key]!r}: expected a {kind.__name__}") from err


def _auto_prompter_ready(parser: Any, bundle: Path) -> bool:
    """Whether the bundle prompts by itself: an ``auto_prompter``, and its head's weights if it names any."""
    prompter = parser.get("auto_prompter")
    if prompter is None:
        return False
    if not isinstance(prompter, Mapping) or prompter.get("checkpoint") is None:
        return True  # a prompter without weights of its own
    head = Path(parser.get_parsed_content("auto_prompter#checkpoint"))
    if not head.is_file():
        logger.info(
            "bundle %s: no automatic task, its prompt-free head is not trained (%s is missing; "
            "configs/train_autoprompt_head.yaml trains it)",
            bundle,
            head,
        )
        return False
    return True


def settings_from_conf(conf: Mapping[str, str]) -> LabelModelSettings:
    """`LabelModelSettings` from ``--conf`` pairs and the bundle they name (see the module docstring)."""
    unknown = sorted(set(conf) - KNOWN_KEYS - _MONAILABEL_KEYS)
    if unknown:
        logger.warning("unknown --conf key(s) %s ignored; known keys: %s", unknown, sorted(KNOWN_KEYS))
    bundle_text = str(conf.get("bundle", "")).strip()
    bundle: Path | None
    if bundle_text.lower() == "none":
        bundle = None
    elif bundle_text:
        bundle = Path(bundle_text).expanduser().resolve()
        if not (bundle / "configs").is_dir():
            raise ValueError(f"--conf bundle {bundle_text}: no configs/ folder there (not a bundle)")
    else:
        bundle = default_bundle()  # the checkout's; raises when the package is installed

    s = LabelModelSettings(bundle=bundle)
    if bundle is not None:
        from monai_sam.bundle import bundle_parser  # the same parse as the CLI's

        p = bundle_parser(bundle)
        # model size, image size and window come through inference.yaml from the model record
        for key in ("model_size", "image_size", "window", "checkpoint"):
            if p.get(key) is not None:
                setattr(s, key, p.get_parsed_content(key))
        record = p.get_parsed_content("model_record") if p.get("model_record") is not None else None
        if record is not None:  # the labels the trained parts predict: what /info shows
            s.label_names = dict(record.label_names)
        elif p.get("label_names") is not None:
            s.label_names = {int(k): str(v) for k, v in p.get_parsed_content("label_names").items()}
        s.has_auto_prompter = _auto_prompter_ready(p, bundle)

    checkpoint = str(conf.get("checkpoint", "")).strip()
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise ValueError(f"--conf checkpoint {checkpoint}: file not found")
        s.checkpoint = str(path.resolve())
    if conf.get("model_size"):
        s.model_size = str(conf["model_size"])
    s.image_size = _number(conf, "image_size", int, s.image_size)
    if conf.get("window"):
        s.window = None if str(conf["window"]).lower() == "none" else str(conf["window"])
    if conf.get("labels"):
        s.label_names = _parse_labels(str(conf["labels"]))
    s.device = str(conf.get("device") or s.device)
    s.encoder_batch_size = _number(conf, "encoder_batch_size", int, s.encoder_batch_size)
    s.feature_dtype = str(conf.get("feature_dtype") or s.feature_dtype)
    s.cache_bytes = int(_number(conf, "feature_cache_gb", float, s.cache_bytes / 2**30) * 2**30)
    s.cache_entries = _number(conf, "feature_cache_images", int, s.cache_entries)
    s.cache_age_s = _number(conf, "feature_cache_ttl_s", float, s.cache_age_s)
    s.demo = str(conf.get("demo", "false")).strip().lower() in ("1", "true", "yes")
    if s.encoder_batch_size < 1:
        raise ValueError(f"--conf encoder_batch_size must be >= 1, got {s.encoder_batch_size}")
    return s
