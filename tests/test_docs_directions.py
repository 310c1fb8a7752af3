"""Left/right in the docs is a safety matter: what they say of RAS and LPS axes must be what
the code does (the phantom's liver, on the patient's right, has the larger RAS x)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from monai_sam.data.phantom import LIVER, SPLEEN, make_phantom

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _sides(text: str, frame: str) -> set[str]:
    """Which side each ``<frame> ... x towards the patient's <side>`` phrase names."""
    pattern = rf"{frame}\b[^.;]{{0,40}}?x (?:to|towards) the patient's (left|right)"
    return set(re.findall(pattern, text))


def test_code_puts_the_liver_at_larger_ras_x():
    ph = make_phantom("ct", seed=0)
    centre = {v: np.argwhere(ph.label == v).mean(axis=0) for v in (LIVER, SPLEEN)}
    world_x = {v: (ph.affine @ np.r_[c, 1.0])[0] for v, c in centre.items()}
    assert world_x[LIVER] > world_x[SPLEEN], "RAS x grows towards the patient's right"


def test_prompt_file_doc_says_ras_x_right_and_lps_x_left():
    text = (DOCS / "prompt_file.md").read_text()
    assert _sides(text, "RAS") == {"right"}
    assert _sides(text, "LPS") == {"left"}
    # the worked example: a positive RAS x is towards the patient's right
    assert re.search(r"RAS mm: \d+ mm towards the patient's right", text)
    assert not re.search(r"RAS mm: \d+ mm (?:towards the patient's )?left", text)


def test_conventions_doc_agrees():
    text = (DOCS / "conventions.md").read_text()
    assert "grows towards the patient's right" in text
    assert "liver\n  (patient's right) lies at large `i` and large world `x`" in text
