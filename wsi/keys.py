"""The names inside a per-slide store, and the feature-set key, each spelled once.

Every module that names an array, a group or an attrs key of a store takes the name from here, and the key that
features are stored and trained under is derived here and nowhere else. The layout these names make is
documented in :mod:`wsi.store`. This module imports nothing from ``wsi``, so any room may use it.

>>> feature_set_of({"encoder": "hf-hub:MahmoodLab/UNI", "stain": "macenko"})
'hf-hub:MahmoodLab/UNI+macenko'
>>> features_path(feature_set("hf-hub:MahmoodLab/UNI", "none"))
'features/hf-hub_MahmoodLab_UNI'
"""

from __future__ import annotations

import re

# root attrs
SCHEMA_VERSION = "schema_version"
SLIDE_ID = "slide_id"
SLIDE = "slide"
TILING = "tiling"
LEVELS = "levels"
COMPLETE = "complete"  # also on features/<key> and scores/<run>: set last

# arrays and groups
COORDS = "coords"
TISSUE_FRACTION = "tissue_fraction"
TILES = "tiles"
MASK = "mask"
MASK_TISSUE = "tissue"      # under MASK
MASK_THUMBNAIL = "thumbnail"
MASK_INK = "ink"
FEATURES = "features"
SCORES = "scores"
ATTENTION = "attention"     # under scores/<run>
CLASS_SCORES = "class_scores"
OUT_OF_FOLD = "oof_"        # prefix of the out-of-fold arrays under scores/<run>
FINE = "fine"               # the finer, overlapping grid of high-res heatmaps: fine/coords, fine/features/<key>;
FINE_SCORES = "fine_"       # prefix of its scores under scores/<run>
QC = "qc"                   # slide QC: the group of per-tile arrays, and the root attrs key of its summary
QC_FOCUS = "focus"          # under QC
QC_FLAGS = ("blur", "fold", "bubble")  # under QC, one array each; also their bits in QC_EXCLUDED + "flags": 1, 2, 4
QC_EXCLUDED = "excluded_"   # prefix, under QC, of the arrays of the tiles `tiling.qc: exclude` left out
MASK_QC = ("fold", "bubble")  # under MASK: what QC found on the thumbnail


def encoder_key(feature_set_name: str) -> str:
    """The array name of a feature set: ``hf-hub:MahmoodLab/UNI`` -> ``hf-hub_MahmoodLab_UNI``;
    ``tf_efficientnet_lite0+macenko`` keeps its ``+``."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", feature_set_name)


def feature_set(encoder: str, stain: str | None = "none") -> str:
    """What features are stored and trained under: the encoder's name, with ``+<method>`` when the tiles were
    stain-normalised (``extract.stain``), e.g. ``tf_efficientnet_lite0+macenko``."""
    return encoder if stain in (None, "none") else f"{encoder}+{stain}"


def augmented_set(feature_set_name: str) -> str:
    """Where a feature set's augmented views are stored: ``<feature set>+augment`` (``extract.augment``); not a
    feature set of its own."""
    return f"{feature_set_name}+augment"


def feature_set_of(extract: dict) -> str:
    """The feature set an ``extract:`` config section makes (and training on it reads)."""
    return feature_set(extract["encoder"], extract.get("stain"))


def mask_path(name: str) -> str:
    return f"{MASK}/{name}"


def qc_path(name: str) -> str:
    return f"{QC}/{name}"


def qc_flag_bits(flags):
    """The QC flags of tiles as one number each: 1 blur, 2 fold, 4 bubble (``flags``: a mapping of
    :data:`QC_FLAGS` to boolean arrays), as ``qc/excluded_flags`` stores them and the viewer draws them."""
    return sum(flags[name] * (1 << bit) for bit, name in enumerate(QC_FLAGS))


def features_path(feature_set_name: str) -> str:
    return f"{FEATURES}/{encoder_key(feature_set_name)}"


def scores_path(run: str) -> str:
    return f"{SCORES}/{run}"


def fine_coords_path() -> str:
    return f"{FINE}/{COORDS}"


def fine_features_path(feature_set_name: str) -> str:
    return f"{FINE}/{features_path(feature_set_name)}"
