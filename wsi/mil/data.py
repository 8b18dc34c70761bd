"""Bags for MIL: the labels table joined to the stores, checked before any training, and the folds.

Labels table: a CSV with ``slide_id`` and ``label`` and, optionally, ``patient_id`` (default: the slide id),
``site`` (the institution or scanner the slide comes from: ``mil.cv: site`` / ``leave_one_site_out`` keep each site
whole in one fold, and metrics are also given per site) and ``split`` (``train``/``val``/``test``: use these instead
of cross-validation). Other columns are ignored.
Label names map to class indices in ``mil.classes`` order, or sorted order when that is null; the map is kept
in the model run (``run.json``).

Everything that would make training meaningless is a :class:`ConfigError` raised here, before a fold starts,
naming the labels file and the offending slides: unknown slide ids (no store, or no features for the
encoder), one class only, a class with fewer slides than folds, empty bags, non-finite features, feature
sizes that disagree. Complete stores without a label are not an error; they are listed in ``run.json``.

Folds (``mil.cv``): ``patient`` (default) keeps each patient whole; ``site`` keeps each site whole, with the class
counts balanced across the folds; ``leave_one_site_out`` tests each site in turn on a model trained on the others.
Patient-grouped folds let a model learn a site's stain as a shortcut when a site's class mix differs from the
others' (Howard et al., Nat. Commun. 2021): its cross-validated AUROC then flatters it. A site that holds one class
only is named in a :class:`ConfoundedSiteWarning`: there, label and stain cannot be told apart.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..checks import CV_MODES, check_sites
from ..errors import ConfigError, format_ids
from ..layout import Layout
from ..store import SlideStore, is_complete, open_cohort, store_path

SPLITS = ("train", "val", "test")
VALIDATION = ("auto", "always", "never")


@dataclass(frozen=True)
class Bag:
    """One labelled slide: where its features are and its class index (small, so Dask ships it cheaply)."""

    slide_id: str
    patient_id: str
    label: str
    target: int
    store: str
    n_tiles: int
    split: str | None = None
    site: str | None = None


class ConfoundedSiteWarning(UserWarning):
    """A site holds one class only: a model can tell the class from the site's stain and scanner."""


@dataclass(frozen=True)
class Cohort:
    labels_path: Path
    encoder: str
    classes: tuple[str, ...]
    in_dim: int
    bags: tuple[Bag, ...]
    unlabelled: tuple[str, ...]                 # complete stores that have no row in the labels table
    excluded: tuple[tuple[str, str], ...]       # (slide_id, why) labelled slides left out (mil.skip_missing)


@dataclass(frozen=True)
class Fold:
    """Slide ids of one fold: trained on ``train``, early-stopped on ``val`` (empty: no validation), predicted
    on ``test``."""

    index: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def read_labels(path) -> pd.DataFrame:
    """The labels table as strings, with ``patient_id`` filled in; malformed tables are a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "labels file does not exist", "pass --labels FILE (CSV slide_id,label)")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ConfigError(path, f"labels file is not a readable CSV: {e}") from e
    table.columns = [str(c).strip() for c in table.columns]
    missing = {"slide_id", "label"} - set(table.columns)
    if missing:
        raise ConfigError(path, f"labels file lacks column(s) {sorted(missing)}; it has {list(table.columns)}",
                          "expected slide_id,label[,patient_id,split]")
    table = table.apply(lambda col: col.str.strip())
    for column in ("slide_id", "label"):
        empty = table.index[table[column] == ""]
        if len(empty):
            raise ConfigError(path, f"empty {column} in data row(s) {format_ids(empty + 1)}")
    duplicated = table.loc[table["slide_id"].duplicated(), "slide_id"].unique()
    if len(duplicated):
        raise ConfigError(path, f"slide id(s) listed more than once: {format_ids(duplicated)}")
    if "patient_id" not in table.columns:
        table["patient_id"] = ""
    table.loc[table["patient_id"] == "", "patient_id"] = table["slide_id"]
    if "split" in table.columns:
        bad = table.loc[~table["split"].isin(SPLITS), "slide_id"]
        if len(bad):
            raise ConfigError(path, f"split must be one of {'/'.join(SPLITS)}; slide(s) {format_ids(bad)} have "
                                    f"{format_ids(table.loc[bad.index, 'split'].unique())}")
    if "site" in table.columns:
        check_sites(path, list(table["site"]), list(table["slide_id"]))
    return table


def _class_names(table, classes, path) -> tuple[str, ...]:
    found = sorted(table["label"].unique())
    if classes is None:
        names = tuple(found)
    else:
        names = tuple(str(c) for c in classes)
        unknown = sorted(set(found) - set(names))
        if unknown:
            raise ConfigError(path, f"label(s) {format_ids(unknown)} are not in mil.classes {list(names)}")
    if len(found) < 2:
        raise ConfigError(path, f"labels table has a single class {found[0]!r}; MIL needs at least two"
                          if found else "labels table has no rows")
    return names


def load_cohort(out_dir, labels_path, encoder: str, *, classes=None, skip_missing: bool = False) -> Cohort:
    """Join the labels table to ``OUT/stores`` and check every bag (reads each bag once).

    ``skip_missing``: labelled slides without a complete store or without features for ``encoder`` are left out
    (and listed in :attr:`Cohort.excluded`) instead of being an error.
    """
    labels_path = Path(labels_path)
    table = read_labels(labels_path)
    names = _class_names(table, classes, labels_path)
    index = {name: i for i, name in enumerate(names)}

    excluded, no_store, no_features = [], [], []
    kept = []
    for row in table.itertuples(index=False):
        path = store_path(out_dir, row.slide_id)
        if not is_complete(path):
            no_store.append(row.slide_id)
            excluded.append((row.slide_id, f"no complete store at {path}"))
        elif not (store := SlideStore.open(path)).has_features(encoder):
            no_features.append(row.slide_id)
            excluded.append((row.slide_id, f"no features for encoder {encoder}"))
        else:
            kept.append((row, store))
    if (no_store or no_features) and not skip_missing:
        parts = []
        if no_store:
            parts.append(f"{len(no_store)} labelled slide(s) have no complete store under "
                         f"{Layout(out_dir).stores_dir}: {format_ids(no_store)}")
        if no_features:
            parts.append(f"{len(no_features)} have no features for encoder {encoder}: {format_ids(no_features)}")
        raise ConfigError(labels_path, "; ".join(parts),
                          "fix the slide ids, run `wsi tile`/`wsi extract` for them, or set mil.skip_missing=true")

    bags, empty, non_finite, dims = [], [], [], {}
    for row, store in kept:
        features = store.features(encoder)
        dims.setdefault(features.shape[1], []).append(row.slide_id)
        if features.shape[0] == 0:
            empty.append(row.slide_id)
        elif not np.isfinite(features).all():
            bad_tile = int(np.flatnonzero(~np.isfinite(features).all(axis=1))[0])
            non_finite.append(f"{row.slide_id} (tile {bad_tile})")
        bags.append(Bag(row.slide_id, row.patient_id, row.label, index[row.label], str(store.path),
                        int(features.shape[0]), getattr(row, "split", None), getattr(row, "site", None)))
    problems = []
    if empty:
        problems.append(f"{len(empty)} slide(s) have empty bags (no tiles): {format_ids(empty)}")
    if non_finite:
        problems.append(f"{len(non_finite)} slide(s) have NaN/inf features: {format_ids(non_finite)}")
    if len(dims) > 1:
        problems.append("feature sizes differ between slides: " + "; ".join(
            f"D={d} for {format_ids(ids)}" for d, ids in sorted(dims.items())))
    if problems:
        raise ConfigError(labels_path, "; ".join(problems),
                          f"re-run `wsi extract --encoder {encoder}` for them, or drop them from the labels")
    _require_two_classes(bags, names, labels_path)

    labelled = set(table["slide_id"])
    unlabelled = tuple(s.slide_id for s in open_cohort(out_dir) if s.slide_id not in labelled)
    return Cohort(labels_path, encoder, names, next(iter(dims)) if dims else 0, tuple(bags), unlabelled,
                  tuple(excluded))


def require_views(cohort: Cohort, key: str, views: int) -> None:
    """With ``views`` (``extract.augment``), every bag must have that many complete augmented views under ``key``;
    else a ConfigError naming the labels file and the slides."""
    if not views:
        return
    lacking = []
    for bag in cohort.bags:
        store = SlideStore.open(bag.store)
        if not store.has_features(key) or (store.feature_attrs(key).augment or {}).get("views") != views:
            lacking.append(bag.slide_id)
    if lacking:
        raise ConfigError(cohort.labels_path, f"extract.augment is {views}, and {len(lacking)} labelled slide(s) "
                                              f"lack {views} augmented views ({key}): {format_ids(lacking)}",
                          "run `wsi extract` with the same extract.augment first, or set extract.augment: 0")


def _require_two_classes(bags: list[Bag], names: tuple[str, ...], path) -> None:
    """After skipping slides, at least two classes must still have bags."""
    present = sorted({b.label for b in bags})
    if len(present) < 2:
        raise ConfigError(path, f"after leaving out slides without stores/features, only class(es) "
                                f"{present} remain; MIL needs at least two of {list(names)}")


def make_folds(cohort: Cohort, n_folds: int, seed: int, *, cv: str = "patient", validation: str = "auto",
               min_val_per_class: int = 16) -> list[Fold]:
    """The folds to train: the table's ``split`` column when it has one, else ``n_folds`` stratified folds
    grouped by patient (``cv="patient"``: no patient in two folds) or by site (``cv="site"``: no site in two
    folds), or one fold per site (``cv="leave_one_site_out"``, ``n_folds`` is then ignored); fold ``i`` is the
    test set of fold ``i``, so every slide is predicted exactly once by a model that did not train on it.
    Sites that hold one class only are named in a :class:`ConfoundedSiteWarning`.

    ``validation`` decides whether a fold also holds slides out for early stopping (see :func:`use_validation`):
    the next fold (cyclically) in cross-validation, the ``val`` rows with a split column. Without validation
    those slides train too: on a small cohort the best epoch over a handful of validation bags is noise, and
    the slides are worth more as training data."""
    path = cohort.labels_path
    bags = cohort.bags
    if validation not in VALIDATION:
        raise ConfigError(None, f"mil.validation {validation!r} is not one of {'/'.join(VALIDATION)}")
    if cv not in CV_MODES:
        raise ConfigError(None, f"mil.cv {cv!r} is not one of {'/'.join(CV_MODES)}")
    if cv != "patient":
        check_sites(path, [b.site for b in bags], [b.slide_id for b in bags], cv=cv)
        if any(b.split for b in bags):
            raise ConfigError(path, f"the labels table has a split column, and mil.cv is {cv}",
                              "drop the split column to cross-validate by site, or set mil.cv: patient")
    for site in confounded_sites(cohort):
        warnings.warn(site, ConfoundedSiteWarning, stacklevel=2)
    if any(b.split for b in bags):
        sets = {s: tuple(b.slide_id for b in bags if b.split == s) for s in SPLITS}
        empty = [s for s in ("train", "test") + (("val",) if validation == "always" else ()) if not sets[s]]
        if empty:
            raise ConfigError(path, f"split column has no {'/'.join(empty)} slides",
                              "give train and test slides (and val slides with mil.validation=always), or drop "
                              "the split column to cross-validate")
        counts = [_class_counts(cohort, sets["val"])]
        folds = [Fold(0, sets["train"], sets["val"], sets["test"])]
    else:
        if cv == "leave_one_site_out":
            sites = sorted({b.site for b in bags})
            fold_of, n_folds = np.array([sites.index(b.site) for b in bags]), len(sites)
        else:
            fold_of = _cross_validation_folds(cohort, n_folds, seed, validation, by_site=cv == "site")
        ids = np.array([b.slide_id for b in bags])
        counts = [_class_counts(cohort, ids[fold_of == (i + 1) % n_folds]) for i in range(n_folds)]
        folds = [Fold(i, tuple(ids[(fold_of != i) & (fold_of != (i + 1) % n_folds)]),
                      tuple(ids[fold_of == (i + 1) % n_folds]), tuple(ids[fold_of == i])) for i in range(n_folds)]
    if not use_validation(validation, counts, min_val_per_class):
        order = {b.slide_id: i for i, b in enumerate(bags)}
        folds = [Fold(f.index, tuple(sorted(f.train + f.val, key=order.get)), (), f.test) for f in folds]
    for fold in folds:
        missing = sorted(set(cohort.classes) - {b.label for b in bags if b.slide_id in set(fold.train)})
        if missing:
            raise ConfigError(path, f"fold {fold.index} has no training slides of class(es) {missing}",
                              "add slides of that class or lower mil.folds")
    return folds


def use_validation(validation: str, val_class_counts: list[dict[str, int]], min_val_per_class: int) -> bool:
    """``always``, ``never``, or (``auto``) only when every fold's validation set holds at least
    ``min_val_per_class`` slides of every class: below that, early stopping and best-epoch selection follow the
    noise of a few bags (on a 40-slide cohort, 8 validation bags picked epoch 0 in 2 of 5 folds)."""
    if validation != "auto":
        return validation == "always"
    return all(min(c.values()) >= min_val_per_class for c in val_class_counts)


def _class_counts(cohort: Cohort, slide_ids) -> dict[str, int]:
    chosen = set(slide_ids)
    return {c: sum(b.label == c and b.slide_id in chosen for b in cohort.bags) for c in cohort.classes}


def confounded_sites(cohort: Cohort) -> list[str]:
    """One sentence per site whose slides are all of one class (none without a site column)."""
    found = []
    for site in sorted({b.site for b in cohort.bags if b.site is not None}):
        labels = {b.label for b in cohort.bags if b.site == site}
        if len(labels) == 1:
            n = sum(b.site == site for b in cohort.bags)
            found.append(f"site {site!r} holds only class {next(iter(labels))!r} ({n} slide(s)) in "
                         f"{cohort.labels_path}: its label is confounded with its stain and scanner, so a model can "
                         "learn the site instead of the tissue; cross-validate with mil.cv: site and check the "
                         "per-site metrics")
    return found


def _cross_validation_folds(cohort: Cohort, n_folds: int, seed: int, validation: str, *,
                            by_site: bool = False) -> np.ndarray:
    """The fold index of every bag: stratified by class, grouped by patient (or by site)."""
    from sklearn.model_selection import StratifiedGroupKFold

    path, bags = cohort.labels_path, cohort.bags
    if n_folds < 3 and validation == "always":
        raise ConfigError(path, f"mil.folds is {n_folds}; cross-validation with a validation fold needs at least "
                                "3 folds (test, validation and training folds)")
    for name in cohort.classes:
        slides = sum(b.label == name for b in bags)
        if slides < n_folds:
            raise ConfigError(path, f"class {name!r} has {slides} slide(s), fewer than mil.folds={n_folds}",
                              "lower mil.folds or add slides of that class")
    targets = np.array([b.target for b in bags])
    if by_site:
        return _site_folds(np.array([b.site for b in bags]), targets, n_folds, seed, path)
    # Fewer patients than folds is allowed: some test folds then lack the class, which the pooled out-of-fold
    # metrics tolerate; a fold whose *training* slides lack a class is refused by make_folds.
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    groups = np.array([b.patient_id for b in bags])
    fold_of = np.empty(len(bags), dtype=int)
    for i, (_, test) in enumerate(splitter.split(np.zeros(len(bags)), targets, groups)):
        fold_of[test] = i
    return fold_of


def _site_folds(sites: np.ndarray, targets: np.ndarray, n_folds: int, seed: int, path,
                restarts: int = 256) -> np.ndarray:
    """The fold of every slide, whole sites to a fold, the folds as even as whole sites allow in class mix and
    size.

    Unevenness is the squared distance of each fold's class counts from the cohort's class shares at the fold's
    size, plus the squared distance of its size from an even share. Sites are placed one by one, each in the fold
    where it adds the least unevenness; of ``restarts`` seeded random placing orders the evenest result is kept.
    Sites are few, so this is cheap, and unlike sklearn's greedy StratifiedGroupKFold it finds the pairing of a
    tumour-heavy site with a normal-heavy one that evens the folds."""
    names = np.unique(sites)
    if len(names) < n_folds:
        raise ConfigError(path, f"mil.cv is site and the labels table's site column names {len(names)} sites, "
                                f"fewer than mil.folds={n_folds}", "lower mil.folds, or set mil.cv: leave_one_site_out")
    n_classes = int(targets.max()) + 1
    counts = np.array([np.bincount(targets[sites == name], minlength=n_classes) for name in names], dtype=float)
    shares = counts.sum(axis=0) / counts.sum()
    even = counts.sum() / n_folds

    def unevenness(fold_counts: np.ndarray) -> np.ndarray:
        size = fold_counts.sum(axis=-1, keepdims=True)
        return ((fold_counts - size * shares) ** 2).sum(axis=-1) + (size[..., 0] - even) ** 2

    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    for _ in range(restarts):
        fold_counts = np.zeros((n_folds, n_classes))
        placed = np.empty(len(names), dtype=int)
        for i in rng.permutation(len(names)):
            fold = int(np.argmin(unevenness(fold_counts + counts[i]) - unevenness(fold_counts)))
            fold_counts[fold] += counts[i]
            placed[i] = fold
        cost = unevenness(fold_counts).sum()
        if cost < best_cost - 1e-9:
            best, best_cost = placed, cost
    return best[np.searchsorted(names, sites)]


def class_weights(targets, n_classes: int) -> np.ndarray:
    """Inverse-frequency weights n / (C * n_c) (absent classes get 0), so each class weighs the same."""
    counts = np.bincount(np.asarray(targets, dtype=int), minlength=n_classes).astype(float)
    with np.errstate(divide="ignore"):
        weights = np.where(counts > 0, counts.sum() / (n_classes * counts), 0.0)
    return weights


def subsample(n_tiles: int, limit: int, generator: torch.Generator) -> torch.Tensor | None:
    """Sorted indices of ``limit`` tiles drawn without replacement, on ``generator``'s device (a bag on a GPU is
    subsampled there), or None when the bag is small enough."""
    if n_tiles <= limit:
        return None
    return torch.randperm(n_tiles, generator=generator, device=generator.device)[:limit].sort().values


def bag_bytes(bags, in_dim: int) -> int:
    """Memory that the float32 features of ``bags`` take once loaded."""
    return sum(b.n_tiles for b in bags) * in_dim * 4


def load_bags(bags, encoder: str, in_dim: int, limit_gb: float, loaded=None) -> dict[str, np.ndarray]:
    """The features of ``bags`` in memory, read from their stores once (two reading threads), when all of them
    fit in ``limit_gb`` GB; else only those already in ``loaded`` (the caller re-reads the others when it needs
    them). Training loops over the same bags every epoch: reading and decompressing each bag once instead of
    once an epoch is what keeps a GPU busy."""
    from concurrent.futures import ThreadPoolExecutor

    loaded = dict(loaded or {})
    missing = [b for b in bags if b.slide_id not in loaded]
    if not missing or bag_bytes(missing, in_dim) > limit_gb * 1e9:
        return loaded
    with ThreadPoolExecutor(max_workers=2) as pool:
        for bag, features in zip(missing, pool.map(lambda b: SlideStore.open(b.store).features(encoder), missing)):
            loaded[bag.slide_id] = features
    return loaded
