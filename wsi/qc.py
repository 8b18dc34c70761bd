"""Slide quality control: out-of-focus tiles, tissue folds and air bubbles, found without downloaded weights.

The tiler (:mod:`wsi.tiling`) runs it on what it reads anyway (``tiling.qc``: ``flag`` by default, ``exclude``,
``off``): the focus of each tile from the tile's own pixels as they stream into the store, folds and bubbles
from the thumbnail the tissue mask is computed on. Nothing else is read, and memory does not grow with the
slide: two numbers per tile, and masks on the thumbnail's grid.

Focus (per tile)
----------------
An out-of-focus region loses its fine detail first. Each tile's grey image is reduced to a pyramid (each level half
the last, Gaussian-smoothed: OpenCV's ``pyrDown``) and the mean squared gradient (3x3 Sobel) is taken at level 0
(the tile's pixels; ~0.5-1 um at 0.5 um/px) and level 2 (~2-4 um). Their ratio, the tile's *sharpness* (the root of
the ratio, times 4, so that a tile with no detail finer than level 2 scores about 1), is the same for tissue of any
darkness or amount of texture (it compares the tile with itself), and falls as blur grows: at 0.5 um/px, sharp
tissue of the generator and of the real images of ``tests/data`` scores 2.6-5.9, tissue blurred by a Gaussian of
sigma 1.5 um 1.3-1.8 (``bench/qc.py``). The ratio is taken in each block of the tile's central
:data:`FOCUS_BLOCK_ROWS` rows of its :data:`FOCUS_BLOCKS` x :data:`FOCUS_BLOCKS` blocks (32 um at 256 px and 0.5
um/px; half its pixels, for half the cost: an out-of-focus region is larger than a tile), and the tile's sharpness
is the lower median of those of its blocks that show structure (their own level-3 gradient at least
:data:`STRUCTURE_MIN`; all blocks where none does): a tile at a blurred region's edge, most of its tissue blurred,
keeps most of its fine gradient in its sharp part, so a ratio over the whole tile scores it nearly sharp; the lower
median says how at least half its tissue looks, which is how a tile's blur is judged. Where a tile shows too little
structure to judge (the gradient at level 3, ~4-8 um, below :data:`STRUCTURE_MIN` grey levels per pixel: mucin,
pools of blood, pale secretions), its focus is not judged (NaN) and it is never flagged.

The *focus score* of a tile is its sharpness over the slide's own reference, the :data:`REFERENCE_QUANTILE`
quantile of its judged tiles' sharpness: 1 is as sharp as the slide's sharp tissue, so dense tumour (sharp but
dark) and fat (sharp with little texture) are measured against the same slide's tissue, and a scanner or codec
that keeps less detail everywhere moves the reference, not the scores. A judged tile is **blurred** when its
score is below :data:`BLUR_SCORE_MAX`. A slide whose reference itself is below :data:`SHARPNESS_MIN` (or with no
judged tile) has **no in-focus tissue**: tiling fails it with that cause, a ``failures.csv`` row and a
``qc.csv`` row, instead of tiling it as if it were fine. An out-of-focus region is larger than a tile: a tile
too plain to judge takes the median score of its judged neighbours on the tile grid (8-neighbours, at least
:data:`NEIGHBOURS_MIN` of them judged, else the 24 of the 5 x 5 tiles around it; :func:`neighbour_scores`) and is
flagged by it, so mucin inside a blurred region is flagged with it; with fewer judged tiles around its score stays
NaN and it is never flagged. The median misses a blurred region's plain edge, where most of a tile's neighbours
lie outside the region (a gland's pale secretion, blurred, loses the little structure it had). So a tile not
judged whose own score (its sharpness over the reference) is below :data:`PLAIN_BLUR_SCORE_MAX` takes that score
where it is lower, wherever the tile lies. The bound is stricter than a judged tile's, because a plain tile's own
ratio is mostly its noise: sharp, smooth mucin reads 0.43-0.7 of the reference, blurred secretion 0.3-0.4.

Folds (thumbnail)
-----------------
A fold doubles the section: where the flap lies, the optical density of the tissue doubles and its colour (each
channel's share of the density) stays. Real tissue varies in density too (dense collagen beside loose stroma is
1.6x as dense and as pink), so a fold is measured against the slide's own tissue of its colour, not against
its neighbours: the tissue pixels (leaving out those under :data:`FOLD_PALE_SHARE` of the median density: fat's
vacuoles, lumens) are binned by colour (:data:`FOLD_COLOUR_STEP`), and a pixel is a fold pixel when it is at least
:data:`FOLD_DENSITY_RATIO` times as dense as the :data:`FOLD_REFERENCE_QUANTILE` quantile of the tissue of its
colour (its bin). A fold is a small part of a slide, so that quantile (the median) is single-layer tissue; dense
tumour is bluer than stroma (its haematoxylin) and has its own reference. Mucin has that hue too, at a sixth to a
tenth of dense tumour's density: counted in one reference (or one window's mean, below), it makes a tumour sheet or
nest beside it read as doubled mucin. So the pixels under :data:`FOLD_HUE_PALE_SHARE` of the
:data:`FOLD_HUE_QUANTILE` quantile of the slide's tissue of their colour and the next colours are left out of the
fold tests as pale tissue is (:func:`_hue_dense`); a fold, twice its single layer, leaves that layer in. A fold
pixel must also be at least
:data:`FOLD_LOCAL_RATIO` times as dense as its surroundings: the median over the :data:`FOLD_BLOCK_UM` blocks
within :data:`FOLD_WINDOW_UM` of the (not pale) tissue's mean density per block: a sheet of dense tumour is its own
surroundings, wherever its colour stands among the slide's. The slide's tissue of one colour is not one tissue,
though (a mucin pool's colour may be a denser tissue's elsewhere on the slide), so a pixel is a fold pixel too
when it is at least :data:`FOLD_COLOUR_LOCAL_RATIO` times as dense as the mean of the (not pale) tissue of its
colour or the next colours (one :data:`FOLD_COLOUR_STEP` in red or blue share) within the window
(:data:`FOLD_COLOUR_BLOCK_UM` blocks, at least :data:`FOLD_MIN_PIXELS` of them): dense tumour is its own
colour's surroundings. Fold pixels where most pixels within
:data:`FOLD_SPECK_UM` are so too (a median filter: specks of dense nuclei go), closed over small gaps and kept in
pieces of at least :data:`FOLD_MIN_UM2`, or of at least :data:`FOLD_BAND_MIN_UM2` when band-shaped (their
smallest enclosing rectangle at least :data:`FOLD_BAND_ELONGATION` times as long as wide and at least
:data:`FOLD_BAND_FILL` full: a fold band cut short where it runs into fat; clusters of nuclei are round or
ragged), are the fold mask; so is the band within a smaller piece that is not band-shaped only for the nuclei specks the
closing joined to a narrow fold (:func:`_doubled_band`: with :data:`FOLD_BAND_SPECKS` of its pixels either side of its
axis set aside, a band at least :data:`FOLD_BAND_LONG_UM` long, doubled against its flanks); and so is a piece of
at least :data:`FOLD_RING_MIN_UM2` that is neither but doubled against its ring (:func:`_doubled_ring`: on density
alone, at least :data:`FOLD_RING_RATIO` times as dense as the tissue within :data:`FOLD_RING_UM` around it and
:data:`FOLD_RING_SINGLE_RATIO` times its single tissue, its pale pixels left out (under :data:`FOLD_PALE_SHARE` of the
slide's median: glass at the tissue's edge or a lumen pulls a dense tissue's ring down), and of its
colour within :data:`FOLD_RING_COLOUR`): a fold cut short by the image's edge, a lumen or glass, or a flap over
dense tissue, whose piece is too small or too ragged for the band tests; nests of nuclei and streaks of dense
collagen are bluer or pinker than the tissue around them. Such a piece is not followed along its band (below):
its band may be a dense tissue's edge. A piece that passes none of these is grown over the tissue around it at least
:data:`FOLD_GROW_RATIO` times its surroundings (to at most :data:`FOLD_GROW_MAX` times its area) and kept, cut short,
when the grown piece is at least :data:`FOLD_GROW_MEDIAN` times the slide's median density and doubled against its ring
(:data:`FOLD_GROW_SINGLE_RATIO`, colour within :data:`FOLD_GROW_COLOUR`): a flap of one tissue over another has a mixed
colour whose reference may be a denser tissue's, and only part of it is a candidate. An air bubble (below)
darkens the tissue along its outline, and inside it shows the section paler, fold and single layer alike: inside its
disc less :data:`FOLD_BUBBLE_RIM_UM` all round, a pixel is a fold pixel when it is at least :data:`FOLD_DENSITY_RATIO`
times as dense, each against its colour's reference, as the :data:`FOLD_BUBBLE_QUANTILE` quantile of the tissue inside
the same bubble (not judged where that tissue is mostly pale: under :data:`FOLD_PALE_SHARE` of the slide's median
density), and a piece mostly inside a bubble is kept only when band-shaped (a bubble shifts dense tissue's colour); and
a fold piece found outside the bubbles within :data:`FOLD_BUBBLE_REACH_UM` of a bubble's disc runs on through it, along
its band (its enclosing rectangle's width). A band-shaped fold piece is also followed past either end along its band, in
segments of :data:`FOLD_ALONG_STEP_UM`, for as long as each segment is at least :data:`FOLD_ALONG_RATIO` times as dense
as the mean of the two strips flanking it (:func:`_along_bands`): per pixel, fat's density varies 2x within 100 um, so
doubled fat cannot be told from single fat, but a segment's mean against its flanks' can, and a flap of stroma over fat,
as dense as the stroma beside it, is still about the sum of its two flanks; or :data:`FOLD_ALONG_LESSER` times its
lesser flank when under :data:`FOLD_ALONG_LESSER_DENSER` of its denser flank or under the slide's median density
(doubled fat beside stroma is about twice the fat, a strip of stroma beside fat many times it, and single tissue along
a lumen's edge as dense as the tissue beside it). A stretch
of segments that are not doubled, up to :data:`FOLD_ALONG_BRIDGE_UM` long, is bridged where the band resumes doubled
past it (two segments in a row, or one that holds another fold piece): a fold's stretch over fat under a flap of stroma
is as dense as stroma and cannot be seen, but the band goes on past it. Each fold piece that fills at least
:data:`FOLD_BAND_FILL` of its convex hull is then filled out to its hull (:func:`_filled_bands`): fat under a flap of
stroma, and a flap of fat over stroma, leave notches and holes in a band. Straight bands are also searched for with no
piece to start from (:func:`_straight_bands`): on a grid of :data:`FOLD_SEARCH_UM`, in :data:`FOLD_SEARCH_ANGLES`
directions, bands of :data:`FOLD_SEARCH_WIDTHS_UM` and :data:`FOLD_SEARCH_LENGTH_UM` long each
:data:`FOLD_SEARCH_SEGMENT_UM` segment of which is doubled tissue against its two flanks (strips as wide):
:data:`FOLD_SEARCH_SUM_RATIO` to :data:`FOLD_SEARCH_SUM_MAX` of their sum (a fold is about the sum of its flanks, single
tissue about their mean, a strip of stroma between fat several times their sum) and at least
:data:`FOLD_SEARCH_FLANK_RATIO` times the denser flank (along a dense tumour sheet's straight edge the band is as dense
as the sheet), with no band as wide within half a width across it reading over :data:`FOLD_SEARCH_SUM_MAX` of its own
flanks' sum (a strip of stroma in fat: a band holding part of it and fat reads about the sum of its flanks, one fat,
the other the rest of the strip); such bands are fold pieces, followed along their band and under bubbles as the
others. It finds a fold band over fat where no pixel is a fold pixel, and a band's full width where the fold pixels
cover part of it. Not seen: a fold over fat or under a flap of fat that is neither straight nor doubled over 640 um
beside tissue of one kind (fat doubled beside denser tissue; a flap of stroma over fat looks like stroma), and a fold
that covers much of a slide's tissue of one colour within its window (it becomes its own reference).

Bubbles (thumbnail)
-------------------
An air bubble's outline is a dark, neutral ring: the light is refracted away at the air's edge, whatever lies
under it. Pixels whose optical density exceeds their neighbourhood's (a median over :data:`RIM_WINDOW_UM`) by at
least :data:`RIM_OD_MIN` in every channel, evenly (no channel's excess under :data:`RIM_EVENNESS` of the
largest), in pieces of at least :data:`RIM_MIN_PX` pixels, are rim candidates. OpenCV's Hough transform
(``HOUGH_GRADIENT_ALT``, perfectness :data:`HOUGH_PERFECTNESS`) proposes circles of radius
:data:`BUBBLE_RADIUS_UM` on each group of them (in the group's box grown by the largest radius looked for: an
outline cut into arcs by a fold across it, or by the image's edge, has its circle reach past each arc). OpenCV
proposes only circles whose edges span 35 of its 64 angular bins, more than the test below asks: so it also runs
on every candidate, specks too (they close the gaps of an outline whose pieces cover less), and a group of
candidates that the image's edge cuts (less than that of its circle lies in the image) is also fitted a circle
by least squares. A proposed circle along which rim candidates in pieces of :data:`RIM_MIN_PX` or more lie
(within two pixels) for at least :data:`BUBBLE_MIN_ARC` of its circumference is a bubble, and its disc is the
bubble mask, where tissue fills at least :data:`BUBBLE_TISSUE_MIN` of its inside (its disc less
:data:`FOLD_BUBBLE_RIM_UM` all round): a bubble shows the tissue under it, where a gland's lumen lined by dark cells
is a bright hole with a dark outline, glass within. A bubble over glass alone is not kept either; it covers no tissue.
Dense tumour's nuclei and the edges of dark regions also leave candidates, but not along a circle.

Per tile and per slide
----------------------
A tile is flagged **fold** or **bubble** when that mask covers at least :data:`DEFECT_TILE_SHARE` of its
footprint. Per slide: ``blur_pct``, ``fold_pct``, ``bubble_pct`` are the percentages of the slide's tissue area
(the tiles' tissue fractions summed) in tiles so flagged; the focus summary gives the median and the 10th
percentile of the judged tiles' scores. The report lists the slides over :data:`REPORT_LIMITS`.

>>> import cv2, numpy as np
>>> squares = np.random.default_rng(0).integers(60, 230, (32, 32, 1))
>>> tile = np.kron(squares, np.ones((8, 8, 3))).astype(np.uint8)      # 256 px of sharp 8-px squares
>>> sharpness, structure = focus_features(np.stack([tile, tile, tile, cv2.GaussianBlur(tile, (0, 0), 3)]))
>>> [round(float(v), 1) for v in sharpness], bool((structure >= STRUCTURE_MIN).all())
([3.6, 3.6, 3.6, 1.8], True)
>>> focus = score_focus(sharpness, structure)
>>> focus.blurred.tolist(), round(float(focus.score[3]), 2), focus.in_focus
([False, False, False, True], 0.49, True)
"""

from __future__ import annotations

import csv
import fcntl
import io
import itertools
import math
from dataclasses import dataclass

import cv2
import numpy as np

from .atomic import write_text
from .layout import Layout
from .tissue import glass_colour, tissue_fractions

QC_MODES = ("off", "flag", "exclude")  # tiling.qc: off | flag (keep and mark) | exclude (drop flagged tiles)

# focus (per tile; grey levels of the tile at its stored resolution)
STRUCTURE_MIN = 4.0  # judged tiles: RMS gradient at pyramid level 3 at least this (grey levels per level-3 px / 8)
REFERENCE_QUANTILE = 0.9  # the slide's sharp tissue: this quantile of its judged tiles' sharpness
BLUR_SCORE_MAX = 0.5  # a judged tile whose sharpness is below this share of the slide's reference is blurred
SHARPNESS_MIN = 2.2  # a slide whose reference sharpness is below this has no in-focus tissue
FOCUS_BLOCKS = 4  # a tile's sharpness: the lower median of its 4 x 4 blocks' (32 um at 256 px, 0.5 um/px)
FOCUS_BLOCK_ROWS = 2  # of which the central 2 rows of blocks are measured: half the tile's pixels, for half the cost
NEIGHBOURS_MIN = 3  # a tile too plain to judge takes its judged 8-neighbours' median score when this many are judged
# (else the judged tiles' of the 5 x 5 around it, when this many are judged there)
PLAIN_BLUR_SCORE_MAX = 0.4  # or its own score, when below this

# folds (thumbnail)
FOLD_PALE_SHARE = 0.5  # the colour references leave out tissue under this share of the slide's median density
FOLD_COLOUR_STEP = 0.05  # tissue colours (each channel's share of the density, red and blue) binned this finely
FOLD_HUE_QUANTILE = 0.9  # the references also leave out tissue under FOLD_HUE_PALE_SHARE of this quantile of the
FOLD_HUE_PALE_SHARE = 0.2  # slide's tissue of its colour and the next colours (mucin beside dense tumour's hue)
FOLD_REFERENCE_QUANTILE = 0.5  # a colour's reference density: this quantile of the slide's tissue of that colour
FOLD_DENSITY_RATIO = 1.7  # a fold pixel is at least this times as dense as its colour's reference
FOLD_SPECK_UM = 8.0  # fold pixels need most of the pixels within this distance to be so too (nuclei specks go)
FOLD_MIN_PIXELS = 200  # a colour needs this many tissue pixels to have a reference
FOLD_BLOCK_UM = 64.0  # the surroundings' density is summed per block of this size
FOLD_WINDOW_UM = 704.0  # a pixel's surroundings: the (not pale) tissue within this window
FOLD_LOCAL_RATIO = 1.4  # a fold pixel is also at least this times as dense as its surroundings' median
FOLD_COLOUR_LOCAL_RATIO = 1.4  # or at least this times as dense as the tissue of its colour within the window
FOLD_COLOUR_BLOCK_UM = 128.0  # that window's sums per colour are taken per block of this size
FOLD_MIN_UM2 = 40000.0  # fold pieces smaller than this are dropped (a dark nest, a cluster of nuclei)
FOLD_BAND_MIN_UM2 = 10000.0  # a smaller piece is kept from this size when band-shaped (a fold cut short by fat):
FOLD_BAND_ELONGATION = 2.0  # its enclosing rectangle this many times as long as wide (clusters of nuclei are round
FOLD_BAND_FILL = 0.6  # or ragged) and this share full of it (a band's edges are straight)
FOLD_BAND_SPECKS = 0.1  # or so once this share of its pixels either side of its axis is set aside (nuclei specks
FOLD_BAND_LONG_UM = 400.0  # the closing joins to a narrow fold), when this long (a streak of stroma is shorter) and
# doubled against its flanks (see _doubled_band)
FOLD_RING_MIN_UM2 = 8000.0  # a smaller piece that is neither is kept from this size (a fold cut short by the
# image's edge, a lumen or glass, or a flap over dense tissue) when doubled against its ring (see _doubled_ring):
FOLD_RING_UM = 48.0  # the tissue within this distance around the piece,
FOLD_RING_RATIO = 2.0  # the piece's mean density at least this times the ring's (on density alone),
FOLD_RING_SINGLE_RATIO = 1.75  # and this times the ring's single tissue (its pixels at least FOLD_PALE_SHARE of the
# slide's median: glass at the tissue's edge or a lumen in the ring pulls its mean down, and a dense tissue's edge,
# 1.7x the tissue beside it, passed for doubled),
FOLD_RING_TISSUE = 0.5  # the ring at least this share tissue,
FOLD_GROW_RATIO = 1.3  # a piece that fails the ring test is grown over the tissue at least this times its surroundings
# (FOLD_LOCAL_RATIO's median), the fold's pixels whose mixed colour its colour's reference misjudged, and tested again:
FOLD_GROW_MAX = 2.0  # grown to at most this times its area (more is a dense tissue, not a fold cut short),
FOLD_GROW_SINGLE_RATIO = 1.85  # at least this times the ring's single tissue (and FOLD_RING_RATIO times the ring),
FOLD_GROW_COLOUR = 0.03  # its colour within this of the ring's (a flap of one tissue over another mixes their colours)
FOLD_GROW_MEDIAN = 1.9  # and at least this times the slide's median density (doubled pale tissue beside paler)
FOLD_RING_COLOUR = 0.015  # and no channel's share of the piece's density this far from the ring's (a doubled layer
# keeps its colour; a nest of nuclei or a streak of dense collagen is bluer or pinker than the tissue around it)
FOLD_BUBBLE_REACH_UM = 48.0  # a fold piece this near a bubble's disc (not searched, nor 3 px around it) runs on
# under the bubble, along its band
FOLD_BUBBLE_RIM_UM = 40.0  # folds are looked for inside a bubble's disc less this all round (its outline, 10-20 um
# wide, and the bright ring inside it)
FOLD_BUBBLE_QUANTILE = 0.2  # against this quantile of the bubble's tissue (a fold may cover half of it)
FOLD_ALONG_STEP_UM = 128.0  # a band-shaped fold piece is followed along its band in segments this long (fat's
# density varies 2x within 100 um per pixel; a segment's mean does not)
FOLD_ALONG_RATIO = 1.5  # a segment is fold when at least this times as dense as the mean of its two flanks (at 1.4
# single stroma between a prostate's glands was followed for 600 um past a fold's end)
FOLD_ALONG_GAP_UM = 8.0  # the flanks (each as wide as the band) start this far outside it: the band's blurred edge
FOLD_ALONG_TISSUE = 0.5  # a segment is judged only where the band and both flanks are at least this share tissue
FOLD_ALONG_REACH_UM = 1600.0  # a piece is followed at most this far past its end (bounds the box measured)
FOLD_ALONG_LESSER = (1.6, 2.6)  # or 1.6-2.6 times its lesser flank: doubled tissue of one flank's kind, the other
# flank another tissue (doubled fat beside stroma; a strip of stroma beside fat is several times the fat)
FOLD_ALONG_LESSER_DENSER = 0.9  # when under this share of its denser flank or under the slide's median tissue
# density (doubled fat beside stroma is paler than the stroma; single tissue along a lumen's or glass's edge is as
# dense as the tissue beside it and 1.6-2.6 times the lumen)
FOLD_ALONG_BRIDGE_UM = 256.0  # the run goes on across at most this much of segments not doubled where a doubled one
# follows (fat under a flap of stroma is as dense as stroma: the fold's stretch over fat cannot be seen)
FOLD_ALONG_PIECE = 0.1  # where at least this share of the band holds another fold piece
FOLD_SEARCH_UM = 32.0  # straight bands of doubled tissue are also searched for with no piece to start from, on a
# grid this coarse (its cost grows with the area searched: ~15 ms a 6 x 4.5 mm slide)
FOLD_SEARCH_ANGLES = 16  # in this many directions (11.25 degrees apart)
FOLD_SEARCH_WIDTHS_UM = (96.0, 176.0)  # bands this wide (folds are 60-250 um wide), each flank as wide
FOLD_SEARCH_LENGTH_UM = 640.0  # and this long: straight over it (a nest of tumour, a bend of stroma is not)
FOLD_SEARCH_SEGMENT_UM = 160.0  # every segment this long along it is doubled tissue (fat's density varies 2x within
# 100 um per pixel; a segment's mean does not):
FOLD_SEARCH_SUM_RATIO = 0.95  # at least this share of the sum of its two flanks' mean densities (single tissue: about
FOLD_SEARCH_SUM_MAX = 1.3  # half of it) and at most this share (a strip of stroma between fat: several times it)
FOLD_SEARCH_FLANK_RATIO = 1.2  # and at least this times as dense as its denser flank (a tumour sheet's edge: 1x)
# bubbles (thumbnail)
RIM_WINDOW_UM = 40.0  # a pixel's neighbourhood for the rim test (a median filter this wide: 5 px at 8 um/px)
RIM_OD_MIN = 0.07  # rim candidates exceed their neighbourhood's optical density by this in every channel
RIM_MIN_PX = 12  # and lie in connected pieces of at least this many pixels (an outline, not specks)
RIM_EVENNESS = 0.55  # and evenly: the smallest channel's excess at least this share of the largest (neutral)
BUBBLE_RADIUS_UM = (50.0, 2000.0)  # the bubbles looked for
HOUGH_PERFECTNESS = 0.6  # OpenCV's HOUGH_GRADIENT_ALT param2: how circular an outline must be to be proposed
BUBBLE_MIN_ARC = 0.4  # a proposed circle is a bubble when rim candidates lie along this share of it
BUBBLE_TISSUE_MIN = 0.05  # and tissue fills at least this share of its inside (less FOLD_BUBBLE_RIM_UM all round): a
# bubble shows the tissue under it, a gland's lumen lined by dark cells is glass within (a bubble over glass alone
# flags no tissue)

DEFECT_TILE_SHARE = 0.15  # a tile is a fold (bubble) tile when the fold (bubble) mask covers this share of it

# the report lists the slides whose QC exceeds any of these (percent of the slide's tissue area)
REPORT_LIMITS = {"blur_pct": 10.0, "fold_pct": 5.0, "bubble_pct": 5.0}

QC_BLUR_RGB = (40, 110, 255)  # QC image colours: blurred tiles blue, folds yellow, bubbles cyan
QC_FOLD_RGB = (255, 210, 0)
QC_BUBBLE_RGB = (0, 220, 230)
NO_FOCUS = "no in-focus tissue"  # the cause a slide fails QC with

QC_COLUMNS = ("slide_id", "blur_pct", "fold_pct", "bubble_pct", "focus_median", "focus_p10", "judged_pct",
              "sharpness_ref", "tiles", "blur_tiles", "fold_tiles", "bubble_tiles", "excluded_tiles", "mode",
              "status", "cause")


# --------------------------------------------------------------------------------------------- focus
def focus_features(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sharpness (n,), structure (n,)) of uint8 RGB tiles (n, T, T, 3), float32: see the module docstring.

    Level 0 is measured tile by tile (its gradients stay in the CPU's cache), levels 2 and 3 of all the tiles at
    once (:func:`_stack_gradient_energy`: a tile's own calls there were nearly all Python overhead). Every block
    sum is an exact integer (squared 16-bit gradients), so the order it is summed in does not change a bit."""
    tiles = np.asarray(tiles)
    n = len(tiles)
    sharpness, structure = np.empty(n, np.float32), np.empty(n, np.float32)
    if n == 0:
        return sharpness, structure
    rows = _measured_rows(tiles.shape[1])
    tiles = tiles[:, rows]
    h, w = tiles.shape[1:3]
    blocks = FOCUS_BLOCK_ROWS * FOCUS_BLOCKS
    fine = np.empty((n, blocks))
    gradients = np.empty((h, 2, w), np.int16)  # each row's x gradient, then its y gradient: one norm a block
    coarse_stack = gate_stack = None
    for i in range(n):
        grey = cv2.cvtColor(np.ascontiguousarray(tiles[i]), cv2.COLOR_RGB2GRAY)
        fine[i] = _block_gradient_energy(grey, gradients)
        level = cv2.pyrDown(cv2.pyrDown(grey))
        gate = cv2.pyrDown(level)
        if coarse_stack is None:
            coarse_stack = np.empty((n,) + level.shape, np.uint8)
            gate_stack = np.empty((n,) + gate.shape, np.uint8)
        coarse_stack[i], gate_stack[i] = level, gate
    coarse, gate = _stack_gradient_energy(coarse_stack), _stack_gradient_energy(gate_stack)
    sharpness[:] = _block_median_sharpness(fine, coarse, gate)
    total = gate[:, 0].copy()  # summed left to right, as Python's sum of the blocks
    for k in range(1, blocks):
        total += gate[:, k]
    structure[:] = np.sqrt(total / blocks) / 8.0
    return sharpness, structure


def _block_median_sharpness(fine: np.ndarray, coarse: np.ndarray, gate: np.ndarray) -> np.ndarray:
    """The lower median sharpness of each tile's blocks that show structure (their level-3 gradient energy ``gate``
    at least :data:`STRUCTURE_MIN`'s; all blocks when none does), from (n, blocks) energies: a tile at a blurred
    region's edge is judged by what at least half of its tissue shows, not by its sharp part, which holds most of
    its fine gradient."""
    ratios = 4.0 * np.sqrt(fine / np.maximum(coarse, 1e-6))
    structured = gate >= (8.0 * STRUCTURE_MIN) ** 2
    none = ~structured.any(axis=1)
    structured[none] = True
    ranked = np.sort(np.where(structured, ratios, np.inf), axis=1)
    return ranked[np.arange(len(ranked)), (structured.sum(axis=1) - 1) // 2]


def _measured_rows(size: int) -> slice:
    """The rows of a tile ``size`` px tall whose focus is measured: its central :data:`FOCUS_BLOCK_ROWS` of
    :data:`FOCUS_BLOCKS` rows of blocks (at least one row)."""
    top = size * (FOCUS_BLOCKS - FOCUS_BLOCK_ROWS) // (2 * FOCUS_BLOCKS)
    return slice(top, max(top + 1, size * (FOCUS_BLOCKS + FOCUS_BLOCK_ROWS) // (2 * FOCUS_BLOCKS)))


def _block_edges(size: int, count: int) -> list[int]:
    return [size * k // count for k in range(count + 1)]


_BLOCK_PLANS: dict = {}


def _block_plan(h: int, w: int) -> list[tuple[slice, slice, int]]:
    """Each of the :data:`FOCUS_BLOCK_ROWS` x :data:`FOCUS_BLOCKS` blocks of an (h, w) image (a tile's measured
    rows), row by row: its rows in the interleaved gradients of :func:`_block_gradient_energy`, its columns, its
    size in pixels."""
    plan = _BLOCK_PLANS.get((h, w))
    if plan is None:
        rows, cols = _block_edges(h, FOCUS_BLOCK_ROWS), _block_edges(w, FOCUS_BLOCKS)
        plan = [(slice(2 * top, 2 * bottom), slice(left, right), max((bottom - top) * (right - left), 1))
                for top, bottom in zip(rows[:-1], rows[1:], strict=True)
                for left, right in zip(cols[:-1], cols[1:], strict=True)]
        _BLOCK_PLANS[(h, w)] = plan
    return plan


def _block_gradient_energy(grey: np.ndarray, gradients: np.ndarray | None = None) -> list[float]:
    """Mean squared 3x3 Sobel gradient of a uint8 image in each of its :data:`FOCUS_BLOCK_ROWS` x
    :data:`FOCUS_BLOCKS` blocks, row by row. The x and y gradients are written row by row interleaved into
    ``gradients`` ((h, 2, w) int16, reused from tile to tile), so that one ``cv2.norm`` over a block's rows takes
    both: the sum of their squares, an exact integer."""
    h, w = grey.shape
    if gradients is None:
        gradients = np.empty((h, 2, w), np.int16)
    cv2.Sobel(grey, cv2.CV_16S, 1, 0, dst=gradients[:, 0], ksize=3)
    cv2.Sobel(grey, cv2.CV_16S, 0, 1, dst=gradients[:, 1], ksize=3)
    both = gradients.reshape(2 * h, w)
    return [cv2.norm(both[rows, cols], cv2.NORM_L2SQR) / size for rows, cols, size in _block_plan(h, w)]


def _stack_gradient_energy(stack: np.ndarray) -> np.ndarray:
    """:func:`_block_gradient_energy` of each of (n, h, w) uint8 images at once, (n, blocks) float64: one Sobel
    over the images stacked, each with a row above and below it mirrored as OpenCV's border (``BORDER_REFLECT_101``)
    so that no image sees the next, and the blocks' sums of squares in integers (exact, as OpenCV's)."""
    n, h, w = stack.shape
    if h < FOCUS_BLOCK_ROWS or w < FOCUS_BLOCKS:  # blocks of no pixels: the tile's own measure
        return np.array([_block_gradient_energy(image) for image in stack], np.float64).reshape(n, -1)
    padded = np.empty((n, h + 2, w), np.uint8)
    padded[:, 1:h + 1] = stack
    padded[:, 0], padded[:, h + 1] = stack[:, 1], stack[:, h - 2]
    padded = padded.reshape(n * (h + 2), w)
    gx, gy = cv2.Sobel(padded, cv2.CV_16S, 1, 0, ksize=3), cv2.Sobel(padded, cv2.CV_16S, 0, 1, ksize=3)
    energy = cv2.multiply(gx, gx, dtype=cv2.CV_32S)  # at most 2 x 1020^2 a pixel
    energy += cv2.multiply(gy, gy, dtype=cv2.CV_32S)
    energy = energy.reshape(n, h + 2, w)
    rows, cols = _block_edges(h, FOCUS_BLOCK_ROWS), _block_edges(w, FOCUS_BLOCKS)
    if h % FOCUS_BLOCK_ROWS == 0 and w % FOCUS_BLOCKS == 0:
        bh, bw = h // FOCUS_BLOCK_ROWS, w // FOCUS_BLOCKS
        sums = energy.reshape(n, h + 2, FOCUS_BLOCKS, bw).sum(axis=3, dtype=np.int64)[:, 1:h + 1]
        sums = sums.reshape(n, FOCUS_BLOCK_ROWS, bh, FOCUS_BLOCKS).sum(axis=2)
    else:
        sums = np.add.reduceat(np.add.reduceat(energy[:, 1:h + 1], rows[:-1], axis=1, dtype=np.int64),
                               cols[:-1], axis=2)
    sizes = np.array([[(bottom - top) * (right - left) for left, right in zip(cols[:-1], cols[1:])]
                      for top, bottom in zip(rows[:-1], rows[1:])], np.float64)
    return (sums / sizes).reshape(n, FOCUS_BLOCK_ROWS * FOCUS_BLOCKS)


@dataclass(frozen=True)
class FocusResult:
    """Per-tile focus scores (NaN: not judged) and blur flags, and the slide's reference sharpness."""

    score: np.ndarray
    blurred: np.ndarray
    reference: float  # NaN when no tile was judged
    judged: int

    @property
    def in_focus(self) -> bool:
        """Whether the slide has in-focus tissue to measure against (see :data:`SHARPNESS_MIN`)."""
        return self.judged > 0 and self.reference >= SHARPNESS_MIN


def score_focus(sharpness: np.ndarray, structure: np.ndarray, coords: np.ndarray | None = None,
                footprint: float | None = None) -> FocusResult:
    """Focus scores relative to the slide's own sharp tissue, and blur flags. With the tiles' ``coords`` (their
    top-left corners on a grid ``footprint`` apart), a tile too plain to judge takes the median score of its
    judged neighbours (:func:`neighbour_scores`): an out-of-focus region is larger than a tile."""
    sharpness, structure = np.asarray(sharpness, np.float32), np.asarray(structure, np.float32)
    judged = structure >= STRUCTURE_MIN
    if not judged.any():
        return FocusResult(np.full(len(sharpness), np.nan, np.float32), np.zeros(len(sharpness), bool), math.nan, 0)
    reference = float(np.quantile(sharpness[judged], REFERENCE_QUANTILE))
    own = (sharpness / max(reference, 1e-6)).astype(np.float32)
    score = np.where(judged, own, np.nan).astype(np.float32)
    if coords is not None and footprint and not judged.all():
        score = neighbour_scores(score, coords, footprint)
    plain = ~judged & (own < PLAIN_BLUR_SCORE_MAX)  # a blurred plain tile: its own low score (module docstring)
    score[plain] = np.fmin(score[plain], own[plain])
    return FocusResult(score, ~np.isnan(score) & (score < BLUR_SCORE_MAX), reference, int(judged.sum()))


def neighbour_scores(score: np.ndarray, coords: np.ndarray, footprint: float) -> np.ndarray:
    """``score`` with each NaN (a tile not judged) replaced by the median of its judged 8-neighbours' scores on
    the tile grid, where at least :data:`NEIGHBOURS_MIN` of them are judged; where fewer are, by the median of
    the judged tiles of the next ring too (the 5 x 5 tiles around it: a tile inside a pool of mucin whose
    neighbours are mucin too), again when at least :data:`NEIGHBOURS_MIN` are judged (else it stays NaN). The
    grid's step is the smallest spacing of the coordinates (``footprint`` when they have none: one tile a row)."""
    coords = np.asarray(coords, np.float64)
    step = []
    for axis in (0, 1):
        gaps = np.diff(np.unique(coords[:, axis]))
        step.append(float(gaps.min()) if gaps.size else float(footprint))
    cells = np.round(coords / np.asarray(step)).astype(np.int64)
    cells -= cells.min(axis=0)
    w, h = int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1
    grid = np.full((h + 4, w + 4), np.nan, np.float32)
    grid[cells[:, 1] + 2, cells[:, 0] + 2] = score
    out = score.copy()
    missing = np.nonzero(np.isnan(score))[0]
    for reach in (1, 2):  # the 8 neighbours, then the 24 of the 5 x 5 tiles around
        around = np.stack([grid[cells[missing, 1] + 2 + dy, cells[missing, 0] + 2 + dx]
                           for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1) if dy or dx],
                          axis=1)
        enough = (~np.isnan(around)).sum(axis=1) >= NEIGHBOURS_MIN
        if enough.any():
            out[missing[enough]] = np.nanmedian(around[enough], axis=1)
        missing = missing[~enough]
    return out


# --------------------------------------------------------------------------------------------- thumbnail
@dataclass(frozen=True)
class ThumbnailDefects:
    """Fold and bubble masks on the thumbnail's grid, and the bubbles' circles (x, y, radius; thumbnail px)."""

    fold: np.ndarray
    bubble: np.ndarray
    circles: tuple = ()


_LOG10 = np.log10(np.arange(256, dtype=np.float32) + 1)  # log10(v + 1) of every 8-bit value
_STRIP_ROWS = 64  # the rim test and the glass field's log run in strips of rows: their temporaries stay small
# (fresh thumbnail-sized memory costs its pages' CPU, and a strip's stay in the cache)


def optical_density(rgb: np.ndarray, glass: np.ndarray) -> np.ndarray:
    """-log10 of each channel (plus one) over the glass colour's ((3,) or (h, w, 3)), float32, 0 on glass and
    brighter; the 8-bit image through a table (OpenCV's ``LUT``: numpy's indexing would first copy the image
    as 64-bit indices, eight times its size), the rest in place; a glass field's log strip by strip, so that no
    second thumbnail-sized float image is made (fresh memory costs its pages' CPU)."""
    glass = np.asarray(glass, np.float32)
    od = cv2.LUT(np.ascontiguousarray(rgb, np.uint8), _LOG10)
    if glass.ndim == 1:
        np.subtract(np.log10(glass + 1), od, out=od)
    else:
        for top in range(0, len(od), _STRIP_ROWS):
            strip = od[top:top + _STRIP_ROWS]
            np.subtract(np.log10(glass[top:top + _STRIP_ROWS] + 1), strip, out=strip)
    return np.maximum(od, 0, out=od)


def thumbnail_defects(rgb: np.ndarray, tissue: np.ndarray, mpp: float, *, glass_field_um: float = 1000.0,
                      glass: np.ndarray | None = None) -> ThumbnailDefects:
    """Folds (within ``tissue``) and bubbles (over it) on an RGB uint8 thumbnail whose pixels are ``mpp`` um
    wide; ``glass`` is the glass colour the tissue mask found (:class:`wsi.tissue.TissueMasks`), estimated the
    same way (``tissue.glass_field_um``) when not given."""

    rgb = np.asarray(rgb)[..., :3]
    glass = glass_colour(rgb, mpp, glass_field_um) if glass is None else glass
    od = optical_density(rgb, glass)
    tissue = np.asarray(tissue, bool)
    bubble, circles, insides = _bubbles(od, tissue, mpp)
    # a bubble's outline darkens the tissue without changing its colour, and the tissue seen through it is paler:
    # folds are measured there only against the tissue inside the same bubble, and a fold found running into a
    # bubble runs on under it
    searched = tissue & ~cv2.dilate(bubble.view(np.uint8), np.ones((7, 7), np.uint8)).view(bool) if circles else tissue
    # per pixel, the three channels' optical densities: every fold step's measure (added in place from the image's
    # strided channels, as sum(cv2.split(od)) adds them: split's three planes cost more than the sum)
    density = np.add(od[..., 0], od[..., 1])
    density += od[..., 2]
    # the searched tissue's median density: the single layer the fold tests compare with
    median = float(np.median(density[searched])) if searched.any() else 0.0
    fold, cut = _folds(od, density, searched, median, mpp, insides)
    fold |= _straight_bands(density, searched, mpp)
    if fold.any():
        fold = _along_bands(fold, density, searched, median, mpp)
    fold |= cut  # not followed along: a cut piece's band may be a dense tissue's edge
    if fold.any():
        fold = _filled_bands(fold, searched)
    if circles and fold.any():
        # only a piece found outside the bubbles: one found inside is all of the fold there that shows
        outside = fold.copy()
        for rows, cols, inside in insides:
            outside[rows, cols] &= ~inside
        fold |= _through_bubbles(outside, bubble, tissue, mpp)
    return ThumbnailDefects(fold=fold, bubble=bubble, circles=tuple(circles))


def _straight_bands(density: np.ndarray, searched: np.ndarray, mpp: float) -> np.ndarray:
    """Straight bands of doubled tissue, found with no fold piece to start from: on a grid of
    :data:`FOLD_SEARCH_UM`, in :data:`FOLD_SEARCH_ANGLES` directions, each of :data:`FOLD_SEARCH_WIDTHS_UM` wide and
    :data:`FOLD_SEARCH_LENGTH_UM` long, bands every :data:`FOLD_SEARCH_SEGMENT_UM` segment of which is, in mean
    density over the ``searched`` tissue, :data:`FOLD_SEARCH_SUM_RATIO` to :data:`FOLD_SEARCH_SUM_MAX` of the sum
    of its two flanks' (strips as wide, either side) and at least :data:`FOLD_SEARCH_FLANK_RATIO` times the denser
    flank's, band and flanks at least :data:`FOLD_ALONG_TISSUE` tissue."""
    h, w = searched.shape
    scale = max(1, int(round(FOLD_SEARCH_UM / mpp)))
    small = (max(1, w // scale), max(1, h // scale))
    weight = cv2.resize(searched.astype(np.float32), small, interpolation=cv2.INTER_AREA)
    total = cv2.resize(np.where(searched, density, 0), small, interpolation=cv2.INTER_AREA)  # float32, as density
    found = np.zeros(weight.shape, np.uint8)
    if not weight.any():
        return np.zeros((h, w), bool)
    # the search runs over the tissue's box alone (its cost grows with the area turned), turned about its centre
    # onto a canvas that holds it at any angle
    x, y, bw, bh = cv2.boundingRect((weight > 0).view(np.uint8))
    weight, total = weight[y:y + bh, x:x + bw], total[y:y + bh, x:x + bw]
    side = int(math.ceil(math.hypot(bw, bh))) + 2
    seg = max(1, int(round(FOLD_SEARCH_SEGMENT_UM / (mpp * scale))))
    length = max(seg, int(round(FOLD_SEARCH_LENGTH_UM / (mpp * scale))))
    for k in range(FOLD_SEARCH_ANGLES):
        turn = cv2.getRotationMatrix2D((bw / 2, bh / 2), 180.0 * k / FOLD_SEARCH_ANGLES, 1.0)
        turn[:, 2] += ((side - bw) / 2, (side - bh) / 2)
        tissue, dens = (cv2.warpAffine(m, turn, (side, side), flags=cv2.INTER_LINEAR) for m in (weight, total))
        hit = np.zeros((side, side), np.uint8)
        for width_um in FOLD_SEARCH_WIDTHS_UM:
            width = max(1, int(round(width_um / (mpp * scale))))
            band = _doubled_segments(tissue, dens, seg, width)
            # every segment of a band's length doubled: a straight band, not a nest or a bend of stroma
            band = cv2.erode(band.view(np.uint8), np.ones((1, length - seg + 1), np.uint8))
            if band.any():
                hit |= cv2.dilate(band, np.ones((width, length), np.uint8))
        if hit.any():
            found[y:y + bh, x:x + bw] |= cv2.warpAffine(hit, turn, (bw, bh),
                                                        flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
    if not found.any():
        return np.zeros((h, w), bool)
    return cv2.resize(found, (w, h), interpolation=cv2.INTER_NEAREST).view(bool) & searched


def _doubled_segments(tissue: np.ndarray, density: np.ndarray, seg: int, width: int) -> np.ndarray:
    """Where a horizontal segment ``seg`` long and ``width`` wide centred on a pixel is doubled tissue against
    the strips of its width above and below it, from per-pixel ``tissue`` shares and tissue ``density`` sums
    (see :func:`_straight_bands`). A fold is doubled tissue, about the sum of its two flanks, where single
    tissue is about their mean and a strip of stroma between fat several times their sum; and denser than the
    denser flank, where a tumour sheet's edge is as dense as the sheet."""
    area, sums = (cv2.boxFilter(m, -1, (seg, width), normalize=False, borderType=cv2.BORDER_CONSTANT)
                  for m in (tissue, density))
    out = np.zeros(area.shape, bool)
    full = area >= FOLD_ALONG_TISSUE * seg * width
    # measured within the box of the pixels with tissue enough (the turned canvas is mostly empty), on the rows
    # with a flank above and below (the others are never judged), each against the rows a width away
    x, y, bw, bh = cv2.boundingRect(full.view(np.uint8))
    if bh <= 2 * width:
        return out
    mean = sums[y:y + bh, x:x + bw] / np.maximum(area[y:y + bh, x:x + bw], 1e-6)
    full = full[y:y + bh, x:x + bw]
    judged = full[width:-width] & full[:-2 * width]
    judged &= full[2 * width:]
    if judged.any():
        band, above, below = mean[width:-width], mean[:-2 * width], mean[2 * width:]
        doubled = judged & _doubled(band, above, below)
        if doubled.any():
            # a strip of dense tissue between paler, found a little across (at most half a width): a band that
            # holds part of it and the fat beside it reads about the sum of its flanks, one of which holds the rest
            strip = (judged & (band > FOLD_SEARCH_SUM_MAX * (above + below))).view(np.uint8)
            doubled &= ~cv2.dilate(strip, np.ones((2 * (width // 2) + 1, 1), np.uint8)).view(bool)
        out[y + width:y + bh - width, x:x + bw] = doubled
    return out


def _doubled(band, one_flank, other_flank):
    """Whether a band's mean density (arrays, or floats) is doubled tissue against its two flanks': about their
    sum (:data:`FOLD_SEARCH_SUM_RATIO` to :data:`FOLD_SEARCH_SUM_MAX` of it) and at least
    :data:`FOLD_SEARCH_FLANK_RATIO` times the denser one's."""
    flanks = one_flank + other_flank
    return (band >= FOLD_SEARCH_SUM_RATIO * flanks) & (band <= FOLD_SEARCH_SUM_MAX * flanks) & (
        band >= FOLD_SEARCH_FLANK_RATIO * np.maximum(one_flank, other_flank))


def _along_bands(fold: np.ndarray, density: np.ndarray, searched: np.ndarray, median: float,
                 mpp: float) -> np.ndarray:
    """``fold`` with each band-shaped fold piece (its smallest enclosing rectangle at least
    :data:`FOLD_BAND_ELONGATION` times as long as wide) carried on past either end along its band, segment by
    segment (:data:`FOLD_ALONG_STEP_UM` long, the rectangle's width), while a segment's mean density over the
    ``searched`` tissue is at least :data:`FOLD_ALONG_RATIO` times the mean of its two flanks' (strips as wide as
    the band, :data:`FOLD_ALONG_GAP_UM` outside it); it stops at the first segment that is not, or that is under
    :data:`FOLD_ALONG_TISSUE` tissue, band or flanks, or :data:`FOLD_ALONG_REACH_UM` past the end. A segment is
    doubled too at :data:`FOLD_ALONG_LESSER` times its lesser flank's mean when under
    :data:`FOLD_ALONG_LESSER_DENSER` of its denser flank's or under the searched tissue's ``median`` density; a stretch
    of segments not doubled, at most :data:`FOLD_ALONG_BRIDGE_UM` long, is bridged where the band resumes doubled
    past it (two segments in a row, or one where :data:`FOLD_ALONG_PIECE` of the band is another fold piece)."""
    # the lesser-flank test's doubled tissue is paler than the tissue on its other side, or pale itself: a band
    # as dense as its denser flank, a lumen or glass on its other side, is single tissue along the lumen's edge
    count, labels, stats, _ = cv2.connectedComponentsWithStats(fold.view(np.uint8), connectivity=8)
    step, gap = FOLD_ALONG_STEP_UM / mpp, FOLD_ALONG_GAP_UM / mpp
    segments = int(math.ceil(FOLD_ALONG_REACH_UM / FOLD_ALONG_STEP_UM))
    bridge = int(round(FOLD_ALONG_BRIDGE_UM / FOLD_ALONG_STEP_UM))
    h, w = fold.shape
    out = fold.copy()
    for i in range(1, count):
        x, y, bw, bh = (int(v) for v in stats[i][:4])
        ys, xs = np.nonzero(labels[y:y + bh, x:x + bw] == i)
        cx, cy, length, width, ux, uy = _band_axis(xs + x, ys + y)
        half = width / 2
        if length < FOLD_BAND_ELONGATION * width:
            continue  # no band to follow
        r = int(math.ceil(length / 2 + segments * step + 3 * half + gap))
        x0, y0, x1, y1 = max(0, int(cx) - r), max(0, int(cy) - r), min(w, int(cx) + r + 1), min(h, int(cy) + r + 1)
        gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        along = (gx - cx) * ux + (gy - cy) * uy
        across = (gy - cy) * ux - (gx - cx) * uy
        off_axis = np.abs(across)
        flank = (off_axis > half + gap) & (off_axis <= 3 * half + gap)
        strip = np.where(off_axis <= half, 0, np.where(flank, np.where(across > 0, 1, 2), -1))  # band 0, flanks 1, 2
        here = searched[y0:y1, x0:x1]
        value = np.where(here, density[y0:y1, x0:x1], 0)
        seen = fold[y0:y1, x0:x1] & (labels[y0:y1, x0:x1] != i)  # the other fold pieces
        for sign in (1, -1):
            past = sign * along - length / 2
            segment = np.floor(past / step).astype(np.int64)
            measured = (past >= 0) & (segment < segments) & (strip >= 0)
            key = (segment * 3 + strip)[measured]
            area, tissue, total, found = (np.bincount(key, weights=v, minlength=3 * segments).reshape(segments, 3)
                                          for v in (None, here[measured], value[measured], seen[measured]))
            mean = total / np.maximum(tissue, 1)
            # a flap of stroma over fat is about as dense as the stroma it came from on one side and many times
            # the fat on the other: a doubled band is about the sum of its flanks, single tissue about their mean
            lesser = np.minimum(mean[:, 1], mean[:, 2])
            doubled = (tissue >= FOLD_ALONG_TISSUE * np.maximum(area, 1)).all(axis=1) & (
                (mean[:, 0] >= FOLD_ALONG_RATIO * (mean[:, 1] + mean[:, 2]) / 2)
                | ((mean[:, 0] >= FOLD_ALONG_LESSER[0] * lesser) & (mean[:, 0] <= FOLD_ALONG_LESSER[1] * lesser)
                   & ((mean[:, 0] < FOLD_ALONG_LESSER_DENSER * np.maximum(mean[:, 1], mean[:, 2]))
                      | (mean[:, 0] < median))))
            # a stretch of segments not doubled (the fold over fat, a flap of fat over stroma) is bridged when,
            # within FOLD_ALONG_BRIDGE_UM, the band resumes doubled: two segments in a row, or one that holds
            # another fold piece (a nest of dense tumour a little past a fold's end is one doubled segment)
            twice = doubled.copy()
            twice[:-1] &= doubled[1:]
            twice[-1] = False
            resumes = twice | (doubled & (found[:, 0] >= FOLD_ALONG_PIECE * np.maximum(area[:, 0], 1)))
            run = segments if doubled.all() else int(np.argmin(doubled))
            while run < segments:
                ahead = np.flatnonzero(resumes[run + 1:run + bridge + 1])
                if not len(ahead):
                    break
                rest = doubled[run + 1 + int(ahead[0]):]
                run += 1 + int(ahead[0]) + (len(rest) if rest.all() else int(np.argmin(rest)))
            out[y0:y1, x0:x1] |= (strip == 0) & (past >= 0) & (segment < run) & here
    return out


def _filled_bands(fold: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """``fold`` with each piece that fills at least :data:`FOLD_BAND_FILL` of its convex hull filled out to it
    (within ``tissue``): a fold band's stretches over fat under a flap of stroma, and a flap of fat over
    stroma, are as dense as single stroma and leave notches and holes in the band."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(fold.view(np.uint8), connectivity=8)
    out = fold.copy()
    for i in range(1, count):
        x, y, bw, bh, area = (int(v) for v in stats[i][:5])
        ys, xs = np.nonzero(labels[y:y + bh, x:x + bw] == i)
        hull = cv2.convexHull(np.stack([xs, ys], axis=1).astype(np.int32))
        # the hull runs through the outer pixels' centres: half a pixel more all round
        if area < FOLD_BAND_FILL * (cv2.contourArea(hull) + cv2.arcLength(hull, True) / 2 + 1):
            continue  # ragged or bent: no band to fill
        inside = np.zeros((bh, bw), np.uint8)
        cv2.fillConvexPoly(inside, hull, 1)
        out[y:y + bh, x:x + bw] |= inside.view(bool) & tissue[y:y + bh, x:x + bw]
    return out


def _through_bubbles(fold: np.ndarray, bubble: np.ndarray, tissue: np.ndarray, mpp: float) -> np.ndarray:
    """``fold`` with each fold piece that comes within :data:`FOLD_BUBBLE_REACH_UM` of a bubble's disc carried on
    through it: the tissue of the disc (and that reach around it) within the piece's band (its smallest enclosing
    rectangle's width, along its length), where connected to the piece."""
    reach = 2 * max(1, int(round(FOLD_BUBBLE_REACH_UM / mpp))) + 1
    under = cv2.dilate(bubble.view(np.uint8), np.ones((reach, reach), np.uint8)).view(bool)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(fold.view(np.uint8), connectivity=8)
    out = fold.copy()
    bx, by, bw, bh = cv2.boundingRect(under.view(np.uint8))
    for i in range(1, count):
        x, y, w, h = (int(v) for v in stats[i][:4])
        x0, y0, x1, y1 = min(x, bx), min(y, by), max(x + w, bx + bw), max(y + h, by + bh)
        piece = labels[y0:y1, x0:x1] == i
        if not (piece & under[y0:y1, x0:x1]).any():
            continue
        ys, xs = np.nonzero(piece)
        cx, cy, _, width, ux, uy = _band_axis(xs, ys)
        gy, gx = np.mgrid[0:y1 - y0, 0:x1 - x0]
        band = np.abs((gy - cy) * ux - (gx - cx) * uy) <= width / 2
        grown = (band & under[y0:y1, x0:x1] & tissue[y0:y1, x0:x1]) | piece
        _, parts = cv2.connectedComponents(grown.view(np.uint8), connectivity=8)
        out[y0:y1, x0:x1] |= parts == parts[ys[0], xs[0]]
    return out


def _disc(cx: float, cy: float, radius: float, shape: tuple[int, int]) -> tuple[slice, slice, np.ndarray]:
    """The pixels of an image of ``shape`` within ``radius`` of (cx, cy), in the disc's box (rows, columns; a
    pixel beyond it on each side, whatever the rounding, clipped to the image) and the mask within it."""
    h, w = shape
    x0, x1 = max(0, math.floor(cx - radius) - 1), min(w, math.ceil(cx + radius) + 2)
    y0, y1 = max(0, math.floor(cy - radius) - 1), min(h, math.ceil(cy + radius) + 2)
    yy, xx = np.ogrid[y0:y1, x0:x1]
    return slice(y0, y1), slice(x0, x1), (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2


def _folds(od: np.ndarray, density: np.ndarray, tissue: np.ndarray, slide_median: float, mpp: float,
           insides: list[tuple[slice, slice, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Fold pixels, and apart the pieces cut short kept as doubled against their ring (:func:`_doubled_ring`: not
    followed along their band). Fold pixels: tissue at least twice as dense as the slide's tissue of its colour,
    either the slide's as a whole (and its surroundings) or that colour's within its window (see the module
    docstring); and inside each bubble (``insides``, from :func:`_bubbles`; ``tissue`` leaves them out)
    tissue at least :data:`FOLD_DENSITY_RATIO` times as dense, against its colour's slide reference, as the
    :data:`FOLD_BUBBLE_QUANTILE` quantile of the bubble's tissue so measured: the bubble pales a fold and the
    single tissue beside it alike. ``density`` is the sum of ``od``'s channels (``slide_median`` its median over
    ``tissue``); it is not modified."""
    h, w = tissue.shape
    fold = np.zeros((h, w), bool)
    if tissue.sum() < 64:
        return fold, fold.copy()
    # pale tissue (fat's vacuoles, lumens, thin mucin) says nothing of how dense one layer of the section is
    dense = tissue & (density >= FOLD_PALE_SHARE * slide_median)
    if dense.sum() < 64:
        return fold, fold.copy()
    n = int(math.ceil(1 / FOLD_COLOUR_STEP))
    # the colours of the dense pixels alone (the only ones the tests below judge; bubbles' insides take theirs
    # there): the rest of a thumbnail, mostly glass, would be measured for nothing
    values = density[dense]
    where = _colour_bins(od[..., 0][dense], od[..., 2][dense], values, n)
    # the slide's reference per colour: the FOLD_REFERENCE_QUANTILE quantile of its (not pale) tissue of that
    # colour, from a histogram of density in steps of 1/_LEVELS_PER_OD per colour bin; and of those pixels, the pale
    # ones of a hue whose tissue is many times denser elsewhere on the slide set aside first (their counts taken out)
    hist = _colour_histogram(values, where, n)
    hued = _hue_dense(values, where, hist, n)
    if not hued.all():
        hist -= _colour_histogram(values[~hued], where[~hued], n)
        dense[dense] = hued
        values, where = values[hued], where[hued]
        if len(values) < 64:
            return fold, fold.copy()
    reference = np.full(n * n, np.inf, np.float32)
    have = hist.sum(axis=1) >= FOLD_MIN_PIXELS
    if have.any():
        reference[have] = _histogram_quantile(hist[have], FOLD_REFERENCE_QUANTILE)
    passed = values >= FOLD_DENSITY_RATIO * reference[where]
    local = None
    if passed.any():  # and denser than the tissue around it: a sheet of dense tumour is its own surroundings
        local = _local_density(density, dense, mpp)[dense]
        passed &= values >= FOLD_LOCAL_RATIO * local
    # or denser than the tissue of its colour within its window (a fold over mucin, whose colour elsewhere on
    # the slide may be denser tissue): dense tumour is its own colour's surroundings too
    passed |= values >= FOLD_COLOUR_LOCAL_RATIO * _colour_local_density(values, where, dense, n, mpp)
    candidate = np.zeros((h, w), bool)
    candidate[dense] = passed
    # inside a bubble, against the bubble's own tissue, each pixel as a share of its colour's reference (0 where
    # its colour has none): the bubble pales a fold and the single layer beside it alike. A bubble over tissue
    # that is mostly pale (fat, the tissue's frayed edge; a bubble keeps 0.6-0.85 of the contrast) is not judged
    judged = tissue.copy()
    for rows, cols, inside in insides:
        seen = density[rows, cols][inside]
        relative = seen / reference[_colour_bins(od[rows, cols, 0][inside], od[rows, cols, 2][inside], seen, n)]
        if (relative > 0).sum() >= FOLD_MIN_PIXELS and np.median(seen) >= FOLD_PALE_SHARE * slide_median:
            single = float(np.quantile(relative[relative > 0], FOLD_BUBBLE_QUANTILE))
            candidate[rows, cols][inside] = relative >= FOLD_DENSITY_RATIO * single
            judged[rows, cols] |= inside
    # a fold is a band tens of microns wide: specks (clusters of nuclei a thumbnail pixel wide) go first, then
    # gaps of a couple of pixels close
    closed = _closed(candidate, mpp)
    closed &= judged
    if not closed.any():
        return fold, fold.copy()
    (top, left), count, labels, stats = _pieces(closed)
    box = (slice(top, top + labels.shape[0]), slice(left, left + labels.shape[1]))
    area = stats[:, cv2.CC_STAT_AREA] * mpp * mpp
    # a piece mostly inside a bubble must be band-shaped whatever its size: the bubble shifts the colours of
    # dense tissue (a tumour nest there is measured against another colour's reference), not a band's shape
    under = np.bincount(labels[judged[box] & ~tissue[box]], minlength=count) > stats[:, cv2.CC_STAT_AREA] / 2
    keep = (area >= FOLD_MIN_UM2) & ~under
    keep[0] = False
    shorter = ~keep & (area >= FOLD_BAND_MIN_UM2)
    shorter[0] = False
    for i in np.nonzero(shorter)[0]:
        keep[i] = _band_shaped(labels, stats[i], i)
    if keep.any():
        fold[box] = keep[labels]
    for i in np.nonzero(shorter & ~keep)[0]:  # a narrow fold whose piece took in specks beside it
        x, y, bw, bh = (int(v) for v in stats[i][:4])
        band = _doubled_band(labels[y:y + bh, x:x + bw] == i, left + x, top + y, density, tissue, mpp)
        if band is not None:
            fold[top + y:top + y + bh, left + x:left + x + bw] |= band
            keep[i] = True
    cut = np.zeros((h, w), bool)
    ringed = ~keep & ~under & (area >= FOLD_RING_MIN_UM2)
    ringed[0] = False
    pale = FOLD_PALE_SHARE * slide_median
    for i in np.nonzero(ringed)[0]:  # a piece cut short, doubled against the tissue around it
        x, y, bw, bh = (int(v) for v in stats[i][:4])
        piece = labels[y:y + bh, x:x + bw] == i
        if _doubled_ring(piece, left + x, top + y, od, density, tissue, mpp, pale):
            cut[top + y:top + y + bh, left + x:left + x + bw] |= piece
    # a piece that failed them all, grown over the tissue around it that is dense for its surroundings (a fold's
    # mixed colour may be a denser tissue's, whose reference leaves most of its pixels out): doubled against its ring
    seeds = np.zeros((h, w), bool)
    seeds[box] = (~keep)[labels] & (labels > 0)
    seeds &= ~cut
    if seeds.any():
        if local is None:
            local = _local_density(density, dense, mpp)[dense]
        weak = np.zeros((h, w), bool)
        weak[dense] = values >= FOLD_GROW_RATIO * local
        weak = _closed(weak, mpp) & tissue
        weak |= closed
        (wt, wl), wc, wlab, wst = _pieces(weak)
        wbox = (slice(wt, wt + wlab.shape[0]), slice(wl, wl + wlab.shape[1]))
        sarea = np.bincount(wlab[seeds[wbox]], minlength=wc)
        seeded = (sarea > 0) & (wst[:, cv2.CC_STAT_AREA] <= FOLD_GROW_MAX * sarea)
        held = np.bincount(wlab[(fold | cut)[wbox]], minlength=wc) > 0
        grown = (wst[:, cv2.CC_STAT_AREA] * mpp * mpp >= FOLD_RING_MIN_UM2) & seeded & ~held
        grown[0] = False
        for i in np.nonzero(grown)[0]:
            x, y, bw, bh = (int(v) for v in wst[i][:4])
            piece = wlab[y:y + bh, x:x + bw] == i
            if density[wt + y:wt + y + bh, wl + x:wl + x + bw][piece].mean() < FOLD_GROW_MEDIAN * slide_median:
                continue
            if _doubled_ring(piece, wl + x, wt + y, od, density, tissue, mpp, pale,
                             single_ratio=FOLD_GROW_SINGLE_RATIO, colour=FOLD_GROW_COLOUR):
                cut[wt + y:wt + y + bh, wl + x:wl + x + bw] |= piece
    return fold, cut


def _doubled_ring(piece: np.ndarray, x: int, y: int, od: np.ndarray, density: np.ndarray, tissue: np.ndarray,
                  mpp: float, pale: float, single_ratio: float = FOLD_RING_SINGLE_RATIO,
                  colour: float = FOLD_RING_COLOUR) -> bool:
    """Whether a piece (``piece``: its pixels in its box, whose corner is column ``x``, row ``y``) is doubled tissue
    against its ring, the ``tissue`` within :data:`FOLD_RING_UM` around it (at least :data:`FOLD_RING_TISSUE` of the
    ring): its mean ``density`` over its tissue at least :data:`FOLD_RING_RATIO` times the ring's and at least
    ``single_ratio`` times the ring's single tissue's (the ring's tissue at least ``pale``: :data:`FOLD_PALE_SHARE`
    of the slide's median density; glass at the tissue's edge and lumens say nothing of one layer), and its colour
    (each channel's share of the summed ``od``) within ``colour`` of the ring's (a grown piece is judged with
    :data:`FOLD_GROW_SINGLE_RATIO` and :data:`FOLD_GROW_COLOUR`)."""
    r = max(1, int(round(FOLD_RING_UM / mpp)))
    h, w = tissue.shape
    bh, bw = piece.shape
    y0, x0, y1, x1 = max(0, y - r), max(0, x - r), min(h, y + bh + r), min(w, x + bw + r)
    window = np.zeros((y1 - y0, x1 - x0), bool)
    window[y - y0:y - y0 + bh, x - x0:x - x0 + bw] = piece
    ring = cv2.dilate(window.view(np.uint8), _disc_kernel(r)).view(bool) & ~window
    here = tissue[y0:y1, x0:x1]
    seen, around = window & here, ring & here
    if not seen.any() or around.sum() < FOLD_RING_TISSUE * ring.sum():
        return False
    dens = density[y0:y1, x0:x1]
    single = around & (dens >= pale)
    mean = dens[seen].mean()
    if mean < FOLD_RING_RATIO * dens[around].mean() or not single.any() or (
            mean < single_ratio * dens[single].mean()):
        return False
    channels = od[y0:y1, x0:x1]
    own, other = channels[seen].sum(axis=0), channels[around].sum(axis=0)
    return bool(np.abs(own / max(own.sum(), 1e-6) - other / max(other.sum(), 1e-6)).max() <= colour)


def _closed(mask: np.ndarray, mpp: float) -> np.ndarray:
    """Fold candidates as bands: where most pixels within :data:`FOLD_SPECK_UM` are candidates (specks, clusters of
    nuclei a thumbnail pixel wide, go), then closed over gaps of a couple of pixels (16 um)."""
    k = max(1, int(round(FOLD_SPECK_UM / mpp))) * 2 + 1
    majority = cv2.medianBlur(mask.view(np.uint8) * 255, k)  # where most of the pixels around are
    return cv2.morphologyEx(majority, cv2.MORPH_CLOSE, _disc_kernel(16 / mpp)).view(bool)


def _pieces(mask: np.ndarray) -> tuple[tuple[int, int], int, np.ndarray, np.ndarray]:
    """The 8-connected pieces of a bool ``mask`` that has pixels, labelled within the box of its pixels alone
    (labels of the whole thumbnail are fresh memory, whose pages cost CPU too): the box's top left (row,
    column), the count (the background included), the labels within the box and OpenCV's stats (``x``, ``y``
    within the box)."""
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask[y:y + h, x:x + w].view(np.uint8),
                                                               connectivity=8)
    return (y, x), count, labels, stats


def _hue_dense(values: np.ndarray, where: np.ndarray, hist: np.ndarray, n: int) -> np.ndarray:
    """Which pixels (their ``density`` values and colour bins ``where``, whose :func:`_colour_histogram` is ``hist``)
    are at least :data:`FOLD_HUE_PALE_SHARE` of the :data:`FOLD_HUE_QUANTILE` quantile of the slide's tissue of
    their colour or the next colours (one :data:`FOLD_COLOUR_STEP` in red or blue share, as the colour-local test
    pools them): mucin has the hue of dense tumour's haematoxylin at a sixth to a tenth of its density. In one
    colour's reference, or its window's mean, a sheet or nest of tumour beside mucin reads as many times that
    colour's single tissue: doubled. A fold is twice its single tissue, and its colour's denser tissue (the fold
    itself, at most 2-2.5x) leaves its single layer in."""
    padded = np.pad(hist.reshape(n, n, -1), ((1, 1), (1, 1), (0, 0)))
    near = sum(padded[1 + dr:n + 1 + dr, 1 + dc:n + 1 + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1))
    top = _histogram_quantile(near.reshape(n * n, -1), FOLD_HUE_QUANTILE)
    return values >= FOLD_HUE_PALE_SHARE * top[where]


def _colour_histogram(values: np.ndarray, where: np.ndarray, n: int) -> np.ndarray:
    """Per colour bin (``where``, of ``n * n``), the histogram of the pixels' density ``values`` in steps of
    1/:data:`_LEVELS_PER_OD` (denser pixels in the last step): (n * n, :data:`_DENSITY_LEVELS`) counts."""
    levels = np.minimum((values * _LEVELS_PER_OD).astype(np.int64), _DENSITY_LEVELS - 1)
    return np.bincount(where * _DENSITY_LEVELS + levels, minlength=n * n * _DENSITY_LEVELS).reshape(n * n, -1)


def _histogram_quantile(hist: np.ndarray, quantile: float) -> np.ndarray:
    """The ``quantile`` density of each row of :func:`_colour_histogram` counts (the middle of its step), float32."""
    cum = np.cumsum(hist, axis=1)
    return (((cum < (quantile * cum[:, -1])[:, None]).sum(axis=1) + 0.5) / _LEVELS_PER_OD).astype(np.float32)


def _colour_bins(red: np.ndarray, blue: np.ndarray, density: np.ndarray, n: int) -> np.ndarray:
    """The colour bin of pixels (their red and blue optical densities and their ``density``, the sum of the
    three): each channel's share of the density in :data:`FOLD_COLOUR_STEP` steps (truncated to 0..n-1), red's
    times ``n`` plus blue's, int32."""
    scale = np.maximum(density, 1e-6)
    scale *= FOLD_COLOUR_STEP
    np.divide(1, scale, out=scale)
    bins = _colour_steps(np.multiply(red, scale), n)
    bins *= n
    bins += _colour_steps(np.multiply(blue, scale, out=scale), n)
    return bins


def _colour_steps(share: np.ndarray, n: int) -> np.ndarray:
    """A channel's share of the density in colour steps (``share``: the channel over the density, in steps),
    truncated to 0..n-1, int32."""
    steps = share.astype(np.int32)
    return np.clip(steps, 0, n - 1, out=steps)


def _band_shaped(labels: np.ndarray, stats: np.ndarray, i: int) -> bool:
    """Whether piece ``i`` of ``labels`` (its ``stats`` row) is a band: its smallest enclosing rectangle at least
    :data:`FOLD_BAND_ELONGATION` times as long as wide and at least :data:`FOLD_BAND_FILL` full of it."""
    x, y, w, h, area = (int(v) for v in stats[:5])
    ys, xs = np.nonzero(labels[y:y + h, x:x + w] == i)
    _, _, long, short, _, _ = _band_axis(xs, ys)
    return long >= FOLD_BAND_ELONGATION * short and area >= FOLD_BAND_FILL * long * short


def _doubled_band(piece: np.ndarray, x: int, y: int, density: np.ndarray, tissue: np.ndarray,
                  mpp: float) -> np.ndarray | None:
    """The fold in a ``piece`` (a mask in its box, whose corner is column ``x``, row ``y``) that is a narrow band
    with specks at its sides (nuclei the closing joined to it), or None: set aside the :data:`FOLD_BAND_SPECKS`
    share of its pixels farthest out on either side of its axis, the rest spans a rectangle at least
    :data:`FOLD_BAND_LONG_UM` long, :data:`FOLD_BAND_ELONGATION` times as long as wide and :data:`FOLD_BAND_FILL`
    full of the piece, and that rectangle is doubled tissue against its two flanks (strips as wide,
    :data:`FOLD_ALONG_GAP_UM` outside it; their mean ``density`` over the ``tissue``, :func:`_doubled`), band and
    flanks at least :data:`FOLD_ALONG_TISSUE` tissue. The fold is the piece within the rectangle."""
    ys, xs = np.nonzero(piece)
    cx, cy, long, _, ux, uy = _band_axis(xs, ys)
    lo, hi = np.quantile((ys - cy) * ux - (xs - cx) * uy, (FOLD_BAND_SPECKS, 1 - FOLD_BAND_SPECKS))
    width = hi - lo + 1
    if long * mpp < FOLD_BAND_LONG_UM or long < FOLD_BAND_ELONGATION * width or (
            len(xs) < FOLD_BAND_FILL * long * width):
        return None
    h, w = piece.shape
    gap = FOLD_ALONG_GAP_UM / mpp
    reach = int(math.ceil(width + gap)) + 1
    y0, x0 = max(0, y - reach), max(0, x - reach)
    rows, cols = slice(y0, min(tissue.shape[0], y + h + reach)), slice(x0, min(tissue.shape[1], x + w + reach))
    gy, gx = np.ogrid[rows, cols]
    along = (gx - x - cx) * ux + (gy - y - cy) * uy
    across = (gy - y - cy) * ux - (gx - x - cx) * uy
    within = np.abs(along) <= long / 2
    means = []  # the band's, then its two flanks' mean density over their tissue
    for a, b in ((lo - 0.5, hi + 0.5), (hi + gap, hi + gap + width), (lo - gap - width, lo - gap)):
        strip = within & (across >= a) & (across <= b)
        seen = strip & tissue[rows, cols]
        if not strip.any() or seen.sum() < FOLD_ALONG_TISSUE * strip.sum():
            return None
        means.append(float(density[rows, cols][seen].mean()))
    if not _doubled(*means):
        return None
    inside = (across >= lo - 0.5) & (across <= hi + 0.5)
    return piece & inside[y - y0:y - y0 + h, x - x0:x - x0 + w]


def _band_axis(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """The smallest rectangle enclosing a piece's pixels (columns ``xs``, rows ``ys``): its centre ``cx, cy``, its
    length and width as pixel extents (a rectangle of pixel centres spans one less) and the unit vector ``ux, uy``
    along its length."""
    (cx, cy), (a, b), angle = cv2.minAreaRect(np.stack([xs, ys], axis=1).astype(np.float32))
    t = math.radians(angle)
    ux, uy = (math.cos(t), math.sin(t)) if a >= b else (-math.sin(t), math.cos(t))
    return cx, cy, max(a, b) + 1, min(a, b) + 1, ux, uy


_LEVELS_PER_OD = 50  # the colour references' density histogram: steps of 0.02
_DENSITY_LEVELS = 256  # up to a density of 5.1 (denser pixels fall in the last step)


def _colour_local_density(density: np.ndarray, colour: np.ndarray, where: np.ndarray, n: int,
                          mpp: float) -> np.ndarray:
    """The mean density, within :data:`FOLD_WINDOW_UM` of each ``where`` pixel (a square of
    :data:`FOLD_COLOUR_BLOCK_UM` blocks), of the ``where`` pixels whose colour bin is the pixel's or one next to it
    (inf where there are fewer than :data:`FOLD_MIN_PIXELS`), float32, in the order of ``where``'s pixels, as are
    their ``density`` and ``colour`` bins given (a thumbnail's pixels off ``where`` would be measured for
    nothing). Per-block sums per colour bin (one ``bincount``), summed over the window and the neighbouring
    bins."""
    block = max(1, int(round(FOLD_COLOUR_BLOCK_UM / mpp)))
    side = 2 * max(1, int(round(FOLD_WINDOW_UM / FOLD_COLOUR_BLOCK_UM / 2))) + 1
    rows, cols = np.nonzero(where)
    rows, cols = rows // block, cols // block
    # the grid of blocks over the box of the blocks that hold ``where`` pixels alone (a slide's tissue is a part of
    # its thumbnail, and the grids below are one plane per colour): the window's sums beyond it are zeros, as
    # its border is, and sums of float32 densities in OpenCV's float64 box filter are exact either way
    top, left = int(rows.min()), int(cols.min())
    bh, bw = int(rows.max()) - top + 1, int(cols.max()) - left + 1
    cell = (rows - top) * bw + cols - left
    size = bh * bw
    present = np.bincount(colour, minlength=n * n) > 0  # the colours used, in order (np.unique sorts)
    used = np.flatnonzero(present)
    col_index = (np.cumsum(present) - 1)[colour]
    flat = col_index * size + cell
    count = np.bincount(flat, minlength=len(used) * size).astype(np.float32).reshape(len(used), size)
    total = np.bincount(flat, weights=density, minlength=len(used) * size).astype(np.float32)
    total = total.reshape(len(used), size)
    # each colour takes its neighbouring colours' sums too (one step in red or blue share: a 3x3 box over the
    # colour grid), then the window's (a box of blocks)
    ur, uc = np.divmod(used, n)
    neighbours = []  # per step: the colours that have that neighbour, and its row (the same for both grids)
    for dr, dc in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
        other = (ur + dr) * n + uc + dc
        j = np.minimum(np.searchsorted(used, other), len(used) - 1)
        ok = (used[j] == other) & (ur + dr >= 0) & (ur + dr < n) & (uc + dc >= 0) & (uc + dc < n)
        neighbours.append((ok, j[ok]))
    sums = []
    for grid in (count, total):
        near = grid.copy()
        for ok, source in neighbours:
            near[ok] += grid[source]
        planes = np.ascontiguousarray(near.reshape(len(used), bh, bw).transpose(1, 2, 0))
        window = np.empty_like(planes)
        for lo in range(0, len(used), 256):  # OpenCV images have at most 512 channels
            window[..., lo:lo + 256] = cv2.boxFilter(np.ascontiguousarray(planes[..., lo:lo + 256]), -1,
                                                     (side, side), normalize=False,
                                                     borderType=cv2.BORDER_CONSTANT).reshape(bh, bw, -1)
        sums.append(window.reshape(size, len(used)))
    win_count, win_total = sums
    c_here, t_here = win_count[cell, col_index], win_total[cell, col_index]
    return np.where(c_here >= FOLD_MIN_PIXELS, t_here / np.maximum(c_here, 1), np.inf)


def _local_density(density: np.ndarray, where: np.ndarray, mpp: float) -> np.ndarray:
    """The median, over the :data:`FOLD_BLOCK_UM` blocks within :data:`FOLD_WINDOW_UM` of each pixel, of the
    blocks' mean density of the ``where`` pixels (a block with too few of them takes its nearest block's value;
    inf when there is none). A median of blocks: a fold covering a third of the window does not move it. OpenCV's
    8-bit median filter (0.02 density steps), so the cost does not grow with the window."""
    h, w = density.shape
    block = max(1, int(round(FOLD_BLOCK_UM / mpp)))
    small = (max(1, round(w / block)), max(1, round(h / block)))
    weight = cv2.resize(where.astype(np.float32), small, interpolation=cv2.INTER_AREA)
    total = cv2.resize(np.where(where, density, 0), small, interpolation=cv2.INTER_AREA)
    valid = weight >= 0.2
    if not valid.any():
        return np.full((h, w), np.inf, np.float32)
    mean = np.where(valid, total / np.maximum(weight, 1e-6), 0)
    if not valid.all():  # every block takes its nearest valid block's value (raster order labels the zeros)
        _, nearest = cv2.distanceTransformWithLabels((~valid).view(np.uint8), cv2.DIST_L2, 3,
                                                     labelType=cv2.DIST_LABEL_PIXEL)
        sources = mean[valid]
        mean = sources[nearest - 1]
    side = 2 * max(1, int(round(FOLD_WINDOW_UM / FOLD_BLOCK_UM / 2))) + 1
    levels = np.clip(np.round(mean / 0.02), 0, 255).astype(np.uint8)
    median = cv2.medianBlur(levels, side).astype(np.float32) * 0.02
    return cv2.resize(median, (w, h), interpolation=cv2.INTER_NEAREST)


def _disc_kernel(radius_px: float) -> np.ndarray:
    k = max(1, int(round(radius_px)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))


def _circle_through(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float, float] | None:
    """The circle (centre x, y, radius) fitted to the points by least squares (x^2 + y^2 + a x + b y + c = 0:
    linear in a, b, c), None when they fit none (in a line)."""
    x, y = xs.astype(np.float64), ys.astype(np.float64)
    (a, b, c), *_ = np.linalg.lstsq(np.stack([x, y, np.ones_like(x)], 1), -(x * x + y * y), rcond=None)
    r2 = (a * a + b * b) / 4 - c
    return None if not r2 > 0 else (-a / 2, -b / 2, math.sqrt(r2))


def _rim_candidates(od: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """Rim candidates (bool) and each pixel's smallest channel excess over its neighbourhood (float32; the
    candidates' strength): excess optical density over a median of :data:`RIM_WINDOW_UM` in every channel of
    at least :data:`RIM_OD_MIN`, the smallest at least :data:`RIM_EVENNESS` of the largest. Strip by strip,
    each read with the median's reach of rows around it: the same pixels as over the whole thumbnail."""
    h, w = od.shape[:2]
    k = min(255, max(3, int(round(RIM_WINDOW_UM / mpp)) | 1))
    candidate, low = np.empty((h, w), bool), np.empty((h, w), np.float32)
    rows = max(_STRIP_ROWS, 2 * k)  # a wide median's reach is not read again and again
    for top in range(0, h, rows):
        bottom = min(h, top + rows)
        first, last = max(0, top - k // 2), min(h, bottom + k // 2)
        scaled = od[first:last] * 100  # medianBlur takes 8 bits: 0.01 OD steps (truncated)
        background = cv2.medianBlur(np.minimum(scaled, 255, out=scaled).astype(np.uint8), k)
        excess = []  # channel by channel (reductions over an axis of 3 are slow), in place
        for c, b in enumerate(cv2.split(background[top - first:bottom - first])):
            e = np.multiply(b, np.float32(0.01), dtype=np.float32)
            excess.append(np.subtract(od[top:bottom, :, c], e, out=e))
        least = np.minimum(excess[0], excess[1], out=low[top:bottom])
        np.minimum(least, excess[2], out=least)
        high = np.maximum(excess[0], excess[1], out=excess[0])
        np.maximum(high, excess[2], out=high)
        # even (the smallest channel's excess at least RIM_EVENNESS of the largest) and at least RIM_OD_MIN
        np.greater_equal(least, np.multiply(high, RIM_EVENNESS, out=high), out=candidate[top:bottom])
        candidate[top:bottom] &= least >= RIM_OD_MIN
    return candidate, low


def _bubbles(od: np.ndarray, tissue: np.ndarray,
             mpp: float) -> tuple[np.ndarray, list, list[tuple[slice, slice, np.ndarray]]]:
    """Bubble discs, circles and insides: rim candidates (neutral excess density over the neighbourhood's median),
    circles proposed by OpenCV's Hough transform on them (``HOUGH_GRADIENT_ALT``; on the pieces of
    :data:`RIM_MIN_PX` or more, then on every candidate) and fitted to groups the image's edge cuts, each kept
    when rim candidates in such pieces lie along at least :data:`BUBBLE_MIN_ARC` of its circumference (within
    two pixels) and ``tissue`` fills :data:`BUBBLE_TISSUE_MIN` of its inside. A bubble's inside is the tissue within
    its disc less :data:`FOLD_BUBBLE_RIM_UM` all round (its outline and the bright ring inside it), as its disc's box
    (rows, columns) and the mask within it; a circle with none has no inside listed."""
    h, w = od.shape[:2]
    mask = np.zeros((h, w), bool)
    candidate, low = _rim_candidates(od, mpp)
    if np.count_nonzero(candidate) < 8:
        return mask, [], []
    r_min, r_max = BUBBLE_RADIUS_UM[0] / mpp, BUBBLE_RADIUS_UM[1] / mpp
    # specks (JPEG, nuclei, dust) are no outline: pieces of at least RIM_MIN_PX pixels, grouped when close
    (top, left), _, labels, stats = _pieces(candidate)
    big = stats[:, cv2.CC_STAT_AREA] >= RIM_MIN_PX
    big[0] = False
    if not big.any():
        return mask, [], []
    rim = np.zeros((h, w), bool)
    rim[top:top + labels.shape[0], left:left + labels.shape[1]] = big[labels]
    grouped = cv2.dilate(rim.view(np.uint8), np.ones((7, 7), np.uint8))
    count, groups, boxes, _ = cv2.connectedComponentsWithStats(grouped, connectivity=8)
    # groups narrower than this hold no bubble's arc
    wide = [i for i in range(1, count) if max(boxes[i, 2], boxes[i, 3]) >= 1.6 * r_min]
    if not wide:
        return mask, [], []
    # OpenCV proposes a circle only when its edges span 35 of 64 angular bins (HoughCirclesAlt), more than
    # BUBBLE_MIN_ARC asks: an outline whose pieces of RIM_MIN_PX or more cover less is proposed from every
    # candidate (its specks close the gaps), and kept, as any circle, on those pieces alone
    proposed = []
    # Hough on each group's box alone (its cost grows with the image), the pieces' circles first: they are kept
    # over near-copies proposed from every candidate
    for every, i in itertools.product((False, True), wide):
        x, y, bw, bh, _ = boxes[i]
        r_hi = max(3, int(math.ceil(min(r_max, max(bw, bh) / 2 + 4))))
        # the circle of an arc (an outline cut by a fold across it, or by the image's edge) reaches past the
        # arc's box: the box grows by the largest radius looked for, zeros beyond the image
        x0, y0, x1, y1 = x - r_hi, y - r_hi, x + bw + r_hi, y + bh + r_hi
        # the image Hough sees, made in that box alone with the blur's one pixel of margin (the same pixels as
        # made over the whole thumbnail); from every candidate only where the box holds specks (else it is the
        # pieces' image again, and proposes their circles again)
        rows, cols = slice(max(0, y0 - 1), min(h, y1 + 1)), slice(max(0, x0 - 1), min(w, x1 + 1))
        on = (candidate if every else rim)[rows, cols]
        if every and np.array_equal(on, rim[rows, cols]):
            continue
        image = np.clip(np.where(on, low[rows, cols], 0) / (5 * RIM_OD_MIN) * 255, 0, 255).astype(np.uint8)
        image = cv2.GaussianBlur(image, (3, 3), 0.8)
        part = image[max(0, y0) - rows.start:min(h, y1) - rows.start, max(0, x0) - cols.start:min(w, x1) - cols.start]
        part = cv2.copyMakeBorder(part, max(0, -y0), max(0, y1 - h), max(0, -x0), max(0, x1 - w),
                                  cv2.BORDER_CONSTANT, value=0)
        found = cv2.HoughCircles(part, cv2.HOUGH_GRADIENT_ALT, dp=1, minDist=max(2.0, r_min), param1=100,
                                 param2=HOUGH_PERFECTNESS, minRadius=max(2, int(r_min)), maxRadius=r_hi)
        proposed += [] if found is None else [(cx + x0, cy + y0, r) for cx, cy, r in found[0]]
    # nor one with less than 35/64 of it in the image: a group the image's edge cuts is also fitted a circle
    # (least squares on its pieces), kept as any circle when they lie along BUBBLE_MIN_ARC of it
    for i in wide:
        x, y, bw, bh, _ = boxes[i]
        if x > 0 and y > 0 and x + bw < w and y + bh < h:
            continue
        ys, xs = np.nonzero((groups[y:y + bh, x:x + bw] == i) & rim[y:y + bh, x:x + bw])
        fit = _circle_through(xs + x, ys + y)
        proposed += [] if fit is None or not r_min <= fit[2] <= r_max else [fit]
    near = cv2.dilate(rim.view(np.uint8), np.ones((5, 5), np.uint8)).view(bool)  # within two pixels
    circles, insides = [], []
    for cx, cy, r in proposed:
        if any(math.hypot(cx - x, cy - y) < r_min and abs(r - q) < r_min for x, y, q in circles):
            continue  # the same circle, proposed again from the other arc of its outline
        angles = np.linspace(0, 2 * math.pi, max(36, int(2 * math.pi * r)), endpoint=False)
        px = np.round(cx + r * np.cos(angles)).astype(int)
        py = np.round(cy + r * np.sin(angles)).astype(int)
        in_image = (px >= 0) & (px < w) & (py >= 0) & (py < h)
        if in_image.mean() < BUBBLE_MIN_ARC:
            continue
        on_rim = np.zeros(len(angles), bool)
        on_rim[in_image] = near[py[in_image], px[in_image]]
        if on_rim.mean() < BUBBLE_MIN_ARC:
            continue
        rows, cols, interior = _disc(cx, cy, r - FOLD_BUBBLE_RIM_UM / mpp, mask.shape)
        inside = tissue[rows, cols] & interior
        if np.count_nonzero(inside) < BUBBLE_TISSUE_MIN * np.count_nonzero(interior):
            continue
        circles.append((float(cx), float(cy), float(r)))
        if inside.any():
            insides.append((rows, cols, inside))
        rows, cols, disc = _disc(cx, cy, r + 1, mask.shape)  # out to the rim's outer edge
        mask[rows, cols] |= disc
    return mask, circles, insides


def defect_shares(defects: ThumbnailDefects, downsample: float, coords: np.ndarray,
                  footprint: float) -> tuple[np.ndarray, np.ndarray]:
    """The shares of each tile's footprint that the fold and the bubble masks cover (zeros, not measured, for an
    empty mask)."""
    return tuple(tissue_fractions(m, downsample, coords, footprint) if m.any() else np.zeros(len(coords), np.float32)
                 for m in (defects.fold, defects.bubble))


# --------------------------------------------------------------------------------------------- per slide
@dataclass(frozen=True)
class SlideQC:
    """What QC found on one slide's tiles (in the tiler's order) and its summary row."""

    focus: np.ndarray  # float32 (n,): score; NaN where not judged
    blur: np.ndarray  # bool (n,)
    fold: np.ndarray
    bubble: np.ndarray
    sharpness_ref: float
    judged: int
    tissue_fraction: np.ndarray

    @property
    def flagged(self) -> np.ndarray:
        return self.blur | self.fold | self.bubble

    @property
    def in_focus(self) -> bool:
        return self.judged > 0 and self.sharpness_ref >= SHARPNESS_MIN

    def percentages(self) -> dict[str, float]:
        area = float(self.tissue_fraction.sum())
        share = (lambda m: 100.0 * float(self.tissue_fraction[m].sum()) / area) if area > 0 else (lambda m: 0.0)
        return {"blur_pct": share(self.blur), "fold_pct": share(self.fold), "bubble_pct": share(self.bubble)}

    def summary(self) -> dict:
        """The per-slide numbers (store attrs ``qc`` and ``qc.csv``)."""
        judged = self.focus[~np.isnan(self.focus)]
        n = len(self.focus)
        out = {k: round(v, 2) for k, v in self.percentages().items()}
        out.update(focus_median=round(float(np.median(judged)), 3) if judged.size else None,
                   focus_p10=round(float(np.quantile(judged, 0.1)), 3) if judged.size else None,
                   judged_pct=round(100.0 * self.judged / n, 1) if n else 0.0,
                   sharpness_ref=round(self.sharpness_ref, 3) if self.judged else None,
                   tiles=n, blur_tiles=int(self.blur.sum()), fold_tiles=int(self.fold.sum()),
                   bubble_tiles=int(self.bubble.sum()))
        return out


def assess(sharpness: np.ndarray, structure: np.ndarray, fold_share: np.ndarray, bubble_share: np.ndarray,
           tissue_fraction: np.ndarray, coords: np.ndarray | None = None, footprint: float | None = None) -> SlideQC:
    """Flags and scores of a slide's tiles from their focus features and the shares of their footprints that
    the fold and bubble masks cover (with ``coords`` and ``footprint``, tiles too plain to judge take their
    judged neighbours' median score: :func:`score_focus`)."""
    focus = score_focus(sharpness, structure, coords, footprint)
    return SlideQC(focus=focus.score, blur=focus.blurred, fold=np.asarray(fold_share) >= DEFECT_TILE_SHARE,
                   bubble=np.asarray(bubble_share) >= DEFECT_TILE_SHARE, sharpness_ref=focus.reference,
                   judged=focus.judged, tissue_fraction=np.asarray(tissue_fraction, np.float32))


def over_limits(row: dict) -> list[str]:
    """The :data:`REPORT_LIMITS` a ``qc.csv`` row (or summary) exceeds, as ``blur 12.0% > 10%`` phrases."""
    out = []
    for key, limit in REPORT_LIMITS.items():
        try:
            value = float(row.get(key))
        except (TypeError, ValueError):
            continue
        if value > limit:
            out.append(f"{key.removesuffix('_pct')} {value:.1f}% > {limit:g}%")
    return out


# --------------------------------------------------------------------------------------------- QC image
def qc_overlay(rgb: np.ndarray, tiles: dict[str, np.ndarray], downsample: float, coords: np.ndarray,
               footprint: float, defects: ThumbnailDefects | None = None) -> np.ndarray:
    """The QC image with flagged regions tinted in their own colours: blurred tiles blue, fold tiles yellow,
    bubble tiles cyan (``tiles``: bool per tile, keys ``blur``, ``fold``, ``bubble``), and the fold and bubble
    masks outlined in the same colours."""
    rgb = np.asarray(rgb)[..., :3]
    h, w = rgb.shape[:2]
    colours = {"blur": QC_BLUR_RGB, "fold": QC_FOLD_RGB, "bubble": QC_BUBBLE_RGB}
    tints = []  # (pixels, colour) of each kind flagged
    for kind, colour in colours.items():
        flags = tiles.get(kind)
        if flags is None or not np.any(flags):
            continue
        area = np.zeros((h, w), np.uint8)
        for x, y in np.asarray(coords)[np.asarray(flags, bool)]:
            x0, y0 = int(x / downsample), int(y / downsample)
            x1, y1 = int(math.ceil((x + footprint) / downsample)), int(math.ceil((y + footprint) / downsample))
            area[max(0, y0):min(h, y1), max(0, x0):min(w, x1)] = 1
        tints.append((area.astype(bool), colour))
    if tints:  # in float, so that a tile flagged twice takes both tints before rounding down
        out = rgb.astype(np.float32)
        for tint, colour in tints:
            out[tint] = 0.55 * out[tint] + 0.45 * np.asarray(colour, np.float32)
        out = out.astype(np.uint8)
    else:
        out = rgb.copy()
    if defects is not None:
        for mask, colour in ((defects.fold, QC_FOLD_RGB), (defects.bubble, QC_BUBBLE_RGB)):
            if mask.any():
                edge = mask & ~cv2.erode(mask.view(np.uint8), np.ones((3, 3), np.uint8)).view(bool)
                out[edge] = colour
    return out


# --------------------------------------------------------------------------------------------- qc.csv
def qc_row(slide_id: str, mode: str, qc: SlideQC | None = None, *, excluded: int = 0, status: str = "ok",
           cause: str = "") -> dict:
    """One ``qc.csv`` row: the slide's summary, what was excluded, and its status (``ok`` or ``failed``)."""
    row = {c: "" for c in QC_COLUMNS}
    if qc is not None:
        row.update({k: ("" if v is None else v) for k, v in qc.summary().items()})
    row.update(slide_id=slide_id, excluded_tiles=excluded, mode=mode, status=status, cause=" ".join(cause.split()))
    return row


def attrs_row(slide_id: str, attrs) -> dict:
    """A ``qc.csv`` row from a store's :class:`~wsi.store.QCAttrs`."""
    data = attrs.to_dict()
    row = {c: ("" if data.get(c) is None else data.get(c, "")) for c in QC_COLUMNS}
    row.update(slide_id=slide_id, status="ok", cause="")
    return row


def thresholds() -> dict:
    """The constants the flags used (recorded in the store's ``qc`` attrs)."""
    return {"structure_min": STRUCTURE_MIN, "focus_blocks": FOCUS_BLOCKS, "focus_block_rows": FOCUS_BLOCK_ROWS,
            "reference_quantile": REFERENCE_QUANTILE, "blur_score_max": BLUR_SCORE_MAX, "sharpness_min": SHARPNESS_MIN,
            "fold_density_ratio": FOLD_DENSITY_RATIO, "fold_reference_quantile": FOLD_REFERENCE_QUANTILE,
            "fold_hue_quantile": FOLD_HUE_QUANTILE, "fold_hue_pale_share": FOLD_HUE_PALE_SHARE,
            "fold_colour_local_ratio": FOLD_COLOUR_LOCAL_RATIO, "neighbours_min": NEIGHBOURS_MIN,
            "plain_blur_score_max": PLAIN_BLUR_SCORE_MAX,
            "rim_window_um": RIM_WINDOW_UM, "fold_min_um2": FOLD_MIN_UM2,
            "fold_band_min_um2": FOLD_BAND_MIN_UM2, "fold_band_elongation": FOLD_BAND_ELONGATION,
            "fold_band_fill": FOLD_BAND_FILL, "fold_band_specks": FOLD_BAND_SPECKS,
            "fold_band_long_um": FOLD_BAND_LONG_UM, "fold_ring_min_um2": FOLD_RING_MIN_UM2,
            "fold_ring_um": FOLD_RING_UM, "fold_ring_ratio": FOLD_RING_RATIO,
            "fold_ring_single_ratio": FOLD_RING_SINGLE_RATIO, "fold_ring_tissue": FOLD_RING_TISSUE,
            "fold_ring_colour": FOLD_RING_COLOUR, "fold_bubble_reach_um": FOLD_BUBBLE_REACH_UM,
            "fold_bubble_rim_um": FOLD_BUBBLE_RIM_UM, "fold_bubble_quantile": FOLD_BUBBLE_QUANTILE,
            "fold_along_step_um": FOLD_ALONG_STEP_UM, "fold_along_ratio": FOLD_ALONG_RATIO,
            "fold_along_gap_um": FOLD_ALONG_GAP_UM, "fold_along_tissue": FOLD_ALONG_TISSUE,
            "fold_along_reach_um": FOLD_ALONG_REACH_UM, "fold_along_lesser": list(FOLD_ALONG_LESSER),
            "fold_along_lesser_denser": FOLD_ALONG_LESSER_DENSER, "fold_along_bridge_um": FOLD_ALONG_BRIDGE_UM,
            "fold_along_piece": FOLD_ALONG_PIECE, "fold_search_um": FOLD_SEARCH_UM,
            "fold_search_angles": FOLD_SEARCH_ANGLES, "fold_search_widths_um": list(FOLD_SEARCH_WIDTHS_UM),
            "fold_search_length_um": FOLD_SEARCH_LENGTH_UM, "fold_search_segment_um": FOLD_SEARCH_SEGMENT_UM,
            "fold_search_sum_ratio": FOLD_SEARCH_SUM_RATIO, "fold_search_sum_max": FOLD_SEARCH_SUM_MAX,
            "fold_search_flank_ratio": FOLD_SEARCH_FLANK_RATIO, "fold_grow_ratio": FOLD_GROW_RATIO,
            "fold_grow_max": FOLD_GROW_MAX, "fold_grow_single_ratio": FOLD_GROW_SINGLE_RATIO,
            "fold_grow_colour": FOLD_GROW_COLOUR, "fold_grow_median": FOLD_GROW_MEDIAN,
            "rim_od_min": RIM_OD_MIN,
            "bubble_radius_um": list(BUBBLE_RADIUS_UM),
            "hough_perfectness": HOUGH_PERFECTNESS, "bubble_min_arc": BUBBLE_MIN_ARC,
            "defect_tile_share": DEFECT_TILE_SHARE}


def record_qc(out_dir, rows: list[dict]) -> None:
    """Add (or replace) slides' rows of ``OUT/qc.csv`` under an exclusive lock (tile jobs run in parallel);
    nothing is written when every row is already there as it is."""
    path = Layout(out_dir).qc_csv
    path.parent.mkdir(parents=True, exist_ok=True)
    new = {r["slide_id"]: {c: str(r.get(c, "")) for c in QC_COLUMNS} for r in rows}
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = {r["slide_id"]: r for r in read_qc(out_dir)}
        if all(old.get(k) == v for k, v in new.items()):
            return
        merged = sorted({**old, **new}.values(), key=lambda r: r["slide_id"])
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=QC_COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(merged)
        write_text(path, buf.getvalue())


def read_qc(out_dir) -> list[dict]:
    """The rows of ``OUT/qc.csv`` (empty when there is none)."""
    path = Layout(out_dir).qc_csv
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
