"""Synthetic H&E-like whole-slide images and the demo cohort, so the demo and every test run on a fresh machine
with no data.

A second package beside :mod:`wsi`: the runtime never imports it (an import contract in ``pyproject.toml``
says so), and it uses the runtime only for its errors and the DICOM format constants.

* :mod:`wsi_synth.render`: what a slide shows, drawn pixel by pixel at any level, and its ground truth;
* :mod:`wsi_synth.writers`: :func:`write_synthetic_slide`, pyramidal SVS/TIFF files and DICOM WSI folders;
* :mod:`wsi_synth.cohort`: :func:`make_demo_cohort`, the demo's labelled cohort;
* ``python -m wsi_synth DIR``: that cohort from the command line (the workflow's demo mode calls it).
"""

from .cohort import make_demo_cohort
from .render import (
    EOSIN_OD,
    HAEM_OD,
    PEN_INKS,
    SITE_PROFILES,
    SPECK_TS,
    HardCases,
    PenStroke,
    SiteProfile,
    Speck,
    SyntheticSlide,
    composite_marks,
)
from .writers import KINDS, write_synthetic_slide

__all__ = ["EOSIN_OD", "HAEM_OD", "KINDS", "PEN_INKS", "SITE_PROFILES", "SPECK_TS", "HardCases", "PenStroke",
           "SiteProfile", "Speck", "SyntheticSlide", "composite_marks", "make_demo_cohort", "write_synthetic_slide"]
