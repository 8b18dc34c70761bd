"""Cross-validated MIL training: one Dask task per fold, the run folder written atomically.

``OUT/models/<run>/`` (built as ``OUT/models/.<run>.partial-*`` and renamed into place when finished):

=========================  ====================================================================================
``run.json``               written last; ``complete: true``, the model config (rebuilds the network), encoder and
                           its feature attrs, classes (label map: name -> index), training parameters, the
                           slide ids and seed of every fold of every repeat, unlabelled and excluded slides,
                           ``calibration`` (the temperature predict applies), ``ood`` (the out-of-distribution
                           threshold and each slide's out-of-fold score), the metrics
``fold_<i>.safetensors``   the weights fold ``i`` keeps (below); repeat ``r`` holds folds ``r K .. r K + K - 1``
``fold_<i>.json``          per-epoch history of fold ``i`` (train/validation loss, validation balanced
                           accuracy, learning rate, seconds), also logged as each epoch ends
``cv_predictions.csv``     slide_id, patient_id, label, fold (its test fold in the first repeat), ``prob_<class>``
                           per class, predicted, ``ood_score``, ``ood``: each slide scored out of fold (the mean
                           over the repeats of the fold model that did not train on it), calibrated
``metrics.json``           AUROC, balanced accuracy, F1, Brier score, ECE, confusion matrix with 95% bootstrap
                           CIs (:mod:`.metrics`); ``calibration`` (the temperature, the figures uncalibrated),
                           ``ood`` (slides flagged out of fold)
``roc.png``                ROC curve(s) of the pooled out-of-fold predictions
``reliability.png``        reliability diagram of the calibrated out-of-fold predictions (:mod:`.calibration`)
``ood.safetensors``        the training slides' feature statistics (:mod:`.ood`)
=========================  ====================================================================================

Repeats (``mil.repeats``): the whole cross-validation runs ``R`` times, each repeat with its own folds and seeds
(:func:`repeat_seed`); a slide's out-of-fold prediction is the mean over the repeats, and the final model is the
ensemble of all ``R x K`` fold models. One cross-validation's figure depends on its seed (a fold whose model
collapses scores its test slides at 0.0003 or 0.99); the mean over repeats does not follow one draw.

Augmented views (``extract.augment: K``, :mod:`wsi.features.augment`): each epoch, each training bag is one of
its K + 1 versions drawn at random (the raw features or one of the K stain/scanner-augmented views, the same view
for all of the bag's tiles, as a slide is stained and scanned as a whole); validation and test bags are raw.

Calibration (``mil.calibration: temperature``): one temperature fitted on the out-of-fold predictions
(:mod:`.calibration`); it softens over-confident probabilities without changing any call or ranking. ``site``
adds each training site's own temperature and offsets, held near the cohort's (the labels table needs a site
column; checked before any fold).

Training recipe (chosen by the ablation in ``bench/mil_quality.py``; figures in bench/RESULTS.md): AdamW,
learning rate ``mil.lr`` with cosine decay to 1% over ``mil.epochs`` (``mil.schedule: constant`` keeps it),
cross-entropy weighted by inverse class frequency (per bag: every bag's loss is scaled by its class weight), one
bag per step, bags above ``mil.max_train_tiles`` tiles subsampled (training only; validation and test use whole
bags).

Validation (``mil.validation``, decided in :func:`.data.make_folds`): ``auto`` holds a validation fold out only
when every fold's validation set would have at least ``mil.min_val_per_class`` slides of each class. Then a fold
stops early when the validation loss has not improved for ``mil.patience`` epochs (not before
``mil.min_epochs``) and keeps its best validation epoch. Otherwise, the usual case for cohorts of a few dozen
slides, every non-test slide trains for ``mil.epochs`` epochs and the fold keeps the mean of its last
``mil.average_last`` epochs' weights (``mil.keep: average``) or its epoch of least training loss
(``mil.keep: train_loss``). Best-epoch selection on a handful of validation bags follows noise: on a 40-slide
cohort it kept epoch 0 in 2 of 5 folds, and the held-out quarter of the slides was lost to training.

Memory: a fold loads its training and validation bags once (``N x D`` float32 each, two reading threads) when
they fit in ``mil.bag_cache_gb``, and keeps them on its device (GPU memory, on a GPU); above that it re-reads
them from the stores every epoch. Steps do not wait for the device: bags are subsampled on it, and the losses are
read once per epoch (validation: once per evaluation).

Every random draw (initialisation, dropout, bag order, subsampling) comes from generators seeded by
(``mil.seed``, fold), so the same seed gives the same weights on CPU. The initial weights are drawn on the host,
so a fold starts from the same weights on a GPU; without dropout and subsampling (whose masks are drawn on the
device) it trains to the same weights there, up to float rounding (``bench/gpu_check.py`` checks it). CUDA with
autocast (bf16, else fp16 with loss scaling) when a GPU is present; folds ask Dask for ``GPU=1`` on GPU clusters,
so one fold holds one GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from distributed import WorkerPlugin, as_completed, get_worker

from .. import __version__
from ..atomic import write_csv, write_json
from ..checks import check_labels, check_sites, read_label_rows
from ..config import StageConfig, trained_run_name
from ..errors import ConfigError, format_ids
from ..failures import record_failure
from ..keys import augmented_set, feature_set_of
from ..layout import Layout
from ..runner import StageSummary, failed_earlier
from ..store import SlideStore
from .calibration import Calibration, brier, confident_errors, cross_fitted, ece, fit_calibration
from .data import (
    Bag,
    Cohort,
    Fold,
    bag_bytes,
    class_weights,
    load_bags,
    load_cohort,
    make_folds,
    require_views,
    subsample,
)
from .metrics import _point_metrics, classification_metrics, plot_reliability, plot_roc
from .models import MILModel, create_model, model_config
from .ood import DESCRIPTOR, REFERENCE_FILE, fit_out_of_fold, slide_descriptor

RUN_SCHEMA_VERSION = 1
CV_SPLITS = {"patient": "stratified, grouped by patient", "site": "stratified, grouped by site",
             "leave_one_site_out": "one fold per site"}  # run.json's training.split for each mil.cv


@dataclass(frozen=True)
class TrainParams:
    """The ``mil`` keys that steer the optimisation (the model's own keys go into its model config)."""

    epochs: int
    min_epochs: int
    patience: int
    keep: str
    average_last: int
    lr: float
    weight_decay: float
    schedule: str
    max_train_tiles: int
    bag_cache_gb: float
    seed: int
    precision: str
    views: int = 0    # augmented views a training bag is drawn from besides its raw features (extract.augment)

    @classmethod
    def from_config(cls, mil: dict, views: int = 0) -> TrainParams:
        return cls(**{f.name: mil[f.name] for f in fields(cls) if f.name != "views"}, views=views)


@dataclass(frozen=True)
class FoldTask:
    """Everything one fold needs, small enough to ship to a Dask worker: store paths, not features."""

    run_dir: str
    fold: int
    encoder: str
    model: dict
    params: TrainParams
    train: tuple[Bag, ...]
    val: tuple[Bag, ...]
    test: tuple[Bag, ...]


# ------------------------------------------------------------------------------------------ one fold
def fold_seed(seed: int, fold: int) -> int:
    """A well-mixed 63-bit seed for (seed, fold)."""
    return int(np.random.SeedSequence([seed, fold]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = float32; else the autocast dtype :func:`wsi.cluster.choose_precision` picks for ``device``."""
    from ..cluster import choose_precision, torch_dtype

    chosen = choose_precision(precision, str(device), key="mil.precision")
    return None if chosen == "fp32" else torch_dtype(chosen)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def iter_bags(bags, encoder: str, device: torch.device, loaded=None):
    """Yield ``(bag, features (N, D) float32 on device)``: from ``loaded`` (slide id -> features on ``device``)
    when it holds the bag, else read from its store and copied over, the next bag read in a thread while the
    caller works on the current one."""
    loaded = loaded or {}

    def read(bag: Bag):
        if bag.slide_id in loaded:
            return loaded[bag.slide_id]
        return torch.from_numpy(SlideStore.open(bag.store).features(encoder)).to(device, non_blocking=True)

    if not bags:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, bags[0])
        for i, bag in enumerate(bags):
            features = pending.result()
            if i + 1 < len(bags):
                pending = pool.submit(read, bags[i + 1])
            yield bag, features


def bags_on_device(loaded: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """The loaded bags copied to ``device`` once per fold (on CPU the arrays themselves), so that no training
    step copies a bag from the host."""
    return {slide_id: torch.from_numpy(features).to(device) for slide_id, features in loaded.items()}


def _evaluate(model: MILModel, bags, encoder, device, dtype, weights: torch.Tensor, loaded=None):
    """(class-weighted mean loss, probabilities (n, C)) over whole bags; the logits stay on the device and come
    back with the loss in one copy."""
    model.eval()
    logits = []
    with torch.inference_mode():
        for _, features in iter_bags(bags, encoder, device, loaded):
            with autocast_context(device, dtype):
                logits.append(model(features).logits.float())
        logits = torch.stack(logits)
        targets = torch.tensor([b.target for b in bags], device=device)
        losses = weights[targets] * torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        loss = losses.sum() / weights[targets].sum().clamp(min=1e-12)
        host = torch.cat([loss.view(1), torch.softmax(logits, dim=1).flatten()]).cpu().numpy()
    return float(host[0]), host[1:].reshape(len(bags), -1)


class BagViews:
    """The augmented views of the training bags (``views`` of them under ``key``; none when 0): in memory on
    ``device`` when they fit in ``limit_gb`` with the raw bags' share, else read from the stores one view at a
    time."""

    def __init__(self, bags, key: str, views: int, in_dim: int, limit_gb: float, device: torch.device):
        self.key, self.views, self.device = key, views, device
        self.loaded: dict[str, torch.Tensor] = {}
        if views and bag_bytes(bags, in_dim) * (views + 1) <= limit_gb * 1e9:
            self.loaded = {b.slide_id: torch.from_numpy(SlideStore.open(b.store).features(key)).to(device)
                           for b in bags}

    def draw(self, bag: Bag, raw: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """One of the bag's raw features and its views, drawn uniformly (the raw ones when there are no views)."""
        if not self.views:
            return raw
        view = int(rng.integers(self.views + 1))
        if view == 0:
            return raw
        if bag.slide_id in self.loaded:
            return self.loaded[bag.slide_id][view - 1]
        return torch.from_numpy(SlideStore.open(bag.store).features(self.key, view=view - 1)).to(self.device)


class KeptWeights:
    """The weights a fold keeps, chosen as its epochs end (see the module docstring): the best validation epoch
    (``validation``), the epoch of least training loss (``train_loss``), or the mean of the last ``average_last``
    epochs' weights (``average``; 1 = the last epoch)."""

    def __init__(self, rule: str, epochs: int, average_last: int):
        self.rule, self.first_averaged = rule, max(0, epochs - average_last)
        self.state, self.loss, self.epoch, self.averaged = None, float("inf"), -1, 0

    def update(self, model: MILModel, epoch: int, loss: float) -> bool:
        """Offer the weights after ``epoch`` (with its selection loss); True when they are the best so far."""
        current = model.state_dict()
        if self.rule == "average":
            if epoch < self.first_averaged:
                return False
            self.averaged += 1
            if self.state is None:
                self.state = {k: v.detach().clone() for k, v in current.items()}
            else:  # running mean; integer buffers (none in our models) keep the latest value
                for k, v in current.items():
                    if v.is_floating_point():
                        self.state[k] += (v.detach() - self.state[k]) / self.averaged
                    else:
                        self.state[k] = v.detach().clone()
            self.epoch = epoch
            return True
        if self.state is None or loss < self.loss:
            self.state = {k: v.detach().clone() for k, v in current.items()}
            self.loss, self.epoch = loss, epoch
            return True
        return False

    def describe(self) -> str:
        if self.rule == "average":
            return f"mean of epochs {self.first_averaged + 1}-{self.epoch + 1}"  # counted from 1, as logs do
        return f"epoch {self.epoch + 1} (least {'validation' if self.rule == 'validation' else 'training'} loss)"


def train_fold(task: FoldTask, *, device: str | torch.device | None = None, loaded=None,
               progress: Callable[[str], None] | None = None) -> dict:
    """Train fold ``task.fold``, write ``fold_<i>.safetensors`` and ``fold_<i>.json`` into ``task.run_dir``, and
    return a small summary with the test slides' probabilities. ``loaded``: features already in memory (slide
    id -> (N, D)); the fold's training and validation bags are loaded once besides, within ``bag_cache_gb``.
    ``progress`` gets a line as each epoch ends (losses, validation balanced accuracy) and one naming the
    weights kept, while the fold runs."""
    from ..cluster import cudnn_benchmark, worker_device

    device = torch.device(device or worker_device())  # on a Dask worker: its GPU resource decides
    # every bag has its own length: cuDNN's autotuning (on for extraction, maybe on this worker) would re-tune
    # TransMIL's convolutions at every step
    with cudnn_benchmark(False):
        return _train_fold(task, device, loaded, progress)


def _train_fold(task: FoldTask, device: torch.device, loaded, progress) -> dict:
    """:func:`train_fold` on ``device``. The fold's bags stay on the device, are subsampled there, and the
    training loss is read once per epoch: no step waits for the device."""
    from safetensors.torch import save_file

    p = task.params
    dtype = autocast_dtype(p.precision, device)
    seed = fold_seed(p.seed, task.fold)
    init = torch.Generator().manual_seed(seed)
    # dropout masks and subsampling draw on the device; the initial weights on the host, the same on every device
    generator = init if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)
    rng = np.random.default_rng(seed)

    model = create_model(**task.model)
    model.seed(init, dropout=generator)
    model = model.to(device)
    n_classes = task.model["n_classes"]
    weights = torch.tensor(class_weights([b.target for b in task.train], n_classes), dtype=torch.float32,
                           device=device)
    targets = {b.slide_id: torch.tensor([b.target], device=device) for b in task.train}
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=p.epochs, eta_min=p.lr * 0.01)
                if p.schedule == "cosine" else None)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loaded = bags_on_device(load_bags(task.train + task.val, task.encoder, task.model["in_dim"], p.bag_cache_gb,
                                      loaded), device)
    views = BagViews(task.train, augmented_set(task.encoder), p.views, task.model["in_dim"], p.bag_cache_gb,
                     device)
    kept = KeptWeights("validation" if task.val else p.keep, p.epochs, p.average_last)

    started_at = time.time()
    history, stale = [], 0
    for epoch in range(p.epochs):
        model.train()
        started = time.perf_counter()
        order = [task.train[i] for i in rng.permutation(len(task.train))]
        loss_sum = torch.zeros((), device=device)
        for bag, features in iter_bags(order, task.encoder, device, loaded):
            features = views.draw(bag, features, rng)
            keep = subsample(features.shape[0], p.max_train_tiles, generator)
            x = features if keep is None else features[keep]
            with autocast_context(device, dtype):
                out = model(x, label=bag.target)
                loss = (weights[bag.target] * torch.nn.functional.cross_entropy(out.logits.float()[None],
                                                                                targets[bag.slide_id])
                        + out.aux_loss.float())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach()
        train_loss = float(loss_sum)
        train_seconds = time.perf_counter() - started
        lr = optimizer.param_groups[0]["lr"]
        if schedule is not None:
            schedule.step()
        val_loss, val_bacc = None, None
        if task.val:
            val_loss, val_probs = _evaluate(model, task.val, task.encoder, device, dtype, weights, loaded)
            val_bacc = _point_metrics(np.array([b.target for b in task.val]), val_probs)["balanced_accuracy"]
        history.append({"epoch": epoch, "train_loss": train_loss / len(task.train), "val_loss": val_loss,
                        "val_balanced_accuracy": val_bacc, "lr": lr, "train_seconds": train_seconds,
                        "val_seconds": time.perf_counter() - started - train_seconds})
        if progress is not None:
            progress(_epoch_line(task.fold, p.epochs, history[-1]))
        improved = kept.update(model, epoch, val_loss if task.val else train_loss / len(task.train))
        stale = 0 if improved else stale + 1
        if task.val and stale >= p.patience and epoch + 1 >= p.min_epochs:
            break
    model.load_state_dict(kept.state)
    if progress is not None:
        progress(f"fold {task.fold}: weights kept: {kept.describe()}"
                 + (f" (validation loss {kept.loss:.4f})" if task.val else ""))
    _, test_probs = _evaluate(model, task.test, task.encoder, device, dtype, weights, loaded)

    run_dir = Path(task.run_dir)
    save_file({k: v.contiguous().cpu() for k, v in kept.state.items()}, run_dir / f"fold_{task.fold}.safetensors",
              metadata={"fold": str(task.fold), "model": task.model["name"], "encoder": task.encoder})
    summary = {"fold": task.fold, "kept": kept.describe(), "best_epoch": kept.epoch,
               "best_val_loss": kept.loss if task.val else None,
               "epochs_run": len(history), "device": str(device), "autocast": str(dtype) if dtype else "fp32",
               "class_weights": weights.cpu().tolist(), "n_train": len(task.train), "n_val": len(task.val),
               "n_test": len(task.test), "torch_threads": torch.get_num_threads(), "started": started_at,
               "finished": time.time()}
    write_json(run_dir / f"fold_{task.fold}.json", {**summary, "history": history})
    return {**summary, "test": {b.slide_id: probs.tolist() for b, probs in zip(task.test, test_probs)}}


def _epoch_line(fold: int, epochs: int, h: dict) -> str:
    """One epoch of the train log; folds trained without a validation set have no validation figures."""
    val = (f", validation loss {h['val_loss']:.4f}, balanced accuracy {h['val_balanced_accuracy']:.3f}"
           if h["val_loss"] is not None else "")
    return (f"fold {fold} epoch {h['epoch'] + 1}/{epochs}: train loss {h['train_loss']:.4f}{val} "
            f"({h['train_seconds'] + h['val_seconds']:.1f} s)")


class FoldSlot(WorkerPlugin):
    """One fold at a time per worker, using all of the worker's threads (or its one GPU): Dask would otherwise
    start as many folds on a worker as it has threads, each of them using every thread."""

    def setup(self, worker):
        self.lock = threading.Lock()


def _fold_on_worker(task: FoldTask, slot: str, topic: str) -> dict:
    """A fold as a Dask task, in the worker's fold slot (the plugin registered as ``slot``); torch gets the
    worker's threads (the nanny pins OMP_NUM_THREADS to 1). Its progress lines go to the client as events of
    ``topic``: a worker's own output (a SLURM job's, say) never reaches the train log."""
    worker = get_worker()
    with worker.plugins[slot].lock:
        torch.set_num_threads(worker.state.nthreads)
        return train_fold(task, progress=lambda line: worker.log_event(topic, line))


def _store_descriptor(store: str, encoder: str) -> np.ndarray:
    return slide_descriptor(SlideStore.open(store).features(encoder))


def _run_folds(tasks: list[FoldTask], bags, cluster_cfg: dict, progress: bool
               ) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Train ``tasks`` on the cluster; returns their summaries (in task order) and the OOD descriptor of each of
    ``bags`` (slide id -> :func:`.ood.slide_descriptor`), read on the workers beside the folds."""
    from tqdm import tqdm

    from ..cluster import dask_client, gpu_resources

    with dask_client(cluster_cfg, preload=[__name__]) as client:  # its workers run this module
        resources = gpu_resources(client)
        slot = f"wsi-mil-fold-slot-{uuid.uuid4().hex[:8]}"  # per run: trainings sharing a scheduler
        topic = f"wsi-train-progress-{slot[-8:]}"
        client.register_plugin(FoldSlot(), name=slot)
        client.subscribe_topic(topic, lambda event: print(f"wsi train: {event[1]}", flush=True))
        try:
            futures = [client.submit(_fold_on_worker, t, slot, topic, key=f"mil-fold-{t.fold}-{slot[-8:]}",
                                     resources=resources, pure=False) for t in tasks]
            descriptors = client.map(_store_descriptor, [b.store for b in bags], encoder=tasks[0].encoder,
                                     key=[f"mil-ood-{i}-{slot[-8:]}" for i in range(len(bags))], pure=False)
            for _ in tqdm(as_completed(futures), total=len(futures), desc="folds", disable=not progress):
                pass
            results = sorted(client.gather(futures), key=lambda r: r["fold"])  # repeat by repeat, as the tasks
            return results, dict(zip((b.slide_id for b in bags), client.gather(descriptors)))
        finally:
            client.unsubscribe_topic(topic)
            client.unregister_worker_plugin(slot)


# ------------------------------------------------------------------------------------------ the run
def probability_columns(classes) -> list[str]:
    return [f"prob_{c}" for c in classes]


def _commit_dir(tmp: Path, final: Path, old: Path) -> None:
    """Rename ``tmp`` to ``final``; an old run there is replaced as a whole, moved to ``old`` on its way out."""
    if not final.exists():
        os.replace(tmp, final)
        return
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _report_cohort(out_dir, cohort: Cohort) -> None:
    if cohort.unlabelled:
        print(f"wsi train: {len(cohort.unlabelled)} store(s) have no label and are not used: "
              f"{format_ids(cohort.unlabelled)}", file=sys.stderr)
    for slide_id, why in cohort.excluded:
        print(f"wsi train: labelled slide {slide_id} left out: {why}", file=sys.stderr)
        record_failure(out_dir, slide_id, "train", cohort.labels_path, why)


def repeat_seed(seed: int, repeat: int) -> int:
    """The seed of CV repeat ``repeat`` (its folds, initialisation, dropout, bag order): repeat 0 keeps ``mil.seed``
    (a one-repeat run is the run it was before repeats existed), repeat ``j`` adds ``1000 j``, so the repeats of
    seeds 0-999 never share a draw."""
    return seed + 1000 * repeat


@dataclass(frozen=True)
class TrainConfig(StageConfig):
    """The sections the train stage reads (:meth:`~wsi.config.StageConfig.from_config`)."""

    stage: ClassVar[str] = "train"
    labels: str | None
    extract: dict
    cluster: dict
    mil: dict


def _check_labelled(out_dir, labels, mil: dict) -> None:
    """The labelled slides against the stores: none failed an earlier stage (unless ``mil.skip_missing``),
    then :func:`wsi.checks.check_labels`."""
    layout, skip_missing = Layout(out_dir), bool(mil.get("skip_missing"))
    failed = failed_earlier(out_dir, "train", [s for s, _ in read_label_rows(labels)])
    if failed and not skip_missing:
        raise ConfigError(labels, f"{len(failed)} labelled slide(s) failed an earlier stage: "
                          + format_ids(f"{s} [{stage}]" for s, stage in failed.items()),
                          f"their causes are in {layout.failures}; fix them, drop them from the labels, or "
                          "set mil.skip_missing: true")
    check_labels(labels, layout.store_ids(), classes=mil.get("classes"), skip_missing=skip_missing,
                 where=str(layout.stores_dir))


def _number(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else str(value)


def metric_lines(metrics: dict) -> list[str]:
    """One line per cross-validated metric (and class), with its 95% interval."""
    lines = []
    for name, metric in metrics.items():
        values = metric.items() if "value" not in metric else [("", metric)]
        for cls, m in values:
            low, high = (_number(v) for v in m.get("ci95") or (None, None))
            lines.append(f"wsi train: cross-validated {name}{' ' + cls if cls else ''}: {_number(m['value'])} "
                         f"(95% CI {low}-{high})")
    return lines


def train(out_dir, params: TrainConfig, *, progress: bool = True) -> StageSummary:
    """Cross-validate ``mil.model`` on the labelled stores of ``out_dir`` (``mil.repeats`` times, each repeat with
    its own folds and seeds) into the run folder ``OUT/models/<run>``: the summary's one done item and its output
    ``model run``, with the metrics' lines as messages. All input checks (the labels against the stores,
    :func:`.data.load_cohort`, :func:`.data.make_folds`) run before the first fold starts."""
    mil = params.mil
    encoder = feature_set_of(params.extract)  # what features to train on
    if not params.labels:
        raise ConfigError(None, "no labels table (config key labels is null)", "pass --labels FILE")
    _check_labelled(out_dir, params.labels, mil)
    name = trained_run_name(mil, params.extract)
    cohort = load_cohort(out_dir, params.labels, encoder, classes=mil.get("classes"),
                         skip_missing=bool(mil.get("skip_missing")))
    repeats = [make_folds(cohort, mil["folds"], repeat_seed(mil["seed"], r), cv=mil["cv"],
                          validation=mil["validation"], min_val_per_class=mil["min_val_per_class"])
               for r in range(mil["repeats"])]
    model = model_config(mil["model"], cohort.in_dim, len(cohort.classes), mil)
    fit = TrainParams.from_config(mil, views=int(params.extract.get("augment") or 0))
    require_views(cohort, augmented_set(encoder), fit.views)
    check_sites(cohort.labels_path, [b.site for b in cohort.bags], [b.slide_id for b in cohort.bags],
                calibration=mil["calibration"])
    _report_cohort(out_dir, cohort)

    layout = Layout(out_dir)
    layout.models_dir.mkdir(parents=True, exist_ok=True)
    tmp = layout.partial_run(name)
    tmp.mkdir()
    by_id = {b.slide_id: b for b in cohort.bags}
    n_folds = len(repeats[0])
    tasks = [FoldTask(str(tmp), r * n_folds + f.index, encoder, model,
                      dataclasses.replace(fit, seed=repeat_seed(fit.seed, r)),
                      *(tuple(by_id[s] for s in ids) for ids in (f.train, f.val, f.test)))
             for r, folds in enumerate(repeats) for f in folds]
    try:
        results, descriptors = _run_folds(tasks, cohort.bags, params.cluster, progress)
        metrics, calibration, ood = _write_outputs(tmp, cohort, repeats, results, descriptors, mil)
        reported = {k: metrics[k] for k in ("auroc", "balanced_accuracy", "f1", "brier", "ece")}
        first = SlideStore.open(cohort.bags[0].store)
        write_json(tmp / "run.json", {
            "schema_version": RUN_SCHEMA_VERSION, "complete": True, "run": name, "wsi_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": model, "encoder": encoder,
            "feature_attrs": first.feature_attrs(encoder).to_dict(), "classes": list(cohort.classes),
            "label_map": {c: i for i, c in enumerate(cohort.classes)}, "labels": str(cohort.labels_path),
            "training": {**asdict(fit), "validation": mil["validation"], "folds": n_folds,
                         "repeats": len(repeats), "optimizer": "AdamW",
                         "loss": "cross-entropy x inverse class frequency",
                         "split": "given" if cohort.bags[0].split else CV_SPLITS[mil["cv"]],
                         "validation_used": bool(repeats[0][0].val)},
            "folds": [{"fold": t.fold, "repeat": r, "seed": t.params.seed, "weights": f"fold_{t.fold}.safetensors",
                       "train": list(f.train), "val": list(f.val), "test": list(f.test),
                       **{k: res[k] for k in ("kept", "best_epoch", "best_val_loss", "epochs_run")}}
                      for (r, f), t, res in zip(((r, f) for r, folds in enumerate(repeats) for f in folds),
                                                tasks, results)],
            "calibration": calibration.to_dict(),
            "ood": ood,
            "unlabelled": list(cohort.unlabelled), "excluded": [list(e) for e in cohort.excluded],
            "metrics": reported,
        })
        final = layout.run_dir(name)
        _commit_dir(tmp, final, layout.partial_run(name, "old"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return StageSummary("train", done=[str(final)], outputs={"model run": final}, messages=metric_lines(reported),
                        unit="run")


def _write_outputs(run_dir: Path, cohort: Cohort, repeats: list[list[Fold]], results: list[dict],
                   descriptors: dict[str, np.ndarray], mil: dict) -> tuple[dict, Calibration, dict]:
    """cv_predictions.csv, metrics.json, roc.png, reliability.png and ood.safetensors from the folds' test
    predictions (``results`` in the order of the repeats' folds); returns the metrics, the fitted calibration
    (:class:`.calibration.Calibration`) and run.json's ``ood`` entry.

    A slide's out-of-fold probabilities are the mean over the repeats of the fold model that held it out,
    calibrated by the calibration fitted on every slide (the csv's ``prob_*``, as predict writes them into the
    store). The Brier score, ECE and the most confident wrong call are measured on cross-fitted calibrations
    instead (each test fold of the first repeat calibrated by a temperature fitted on the other folds' slides), so
    the fit does not flatter them; no other figure depends on the temperature."""
    by_id = {b.slide_id: b for b in cohort.bags}
    first_fold, held_out = {}, {}
    results = iter(results)
    for folds in repeats:
        for fold in folds:
            result = next(results)
            for slide_id in fold.test:
                held_out.setdefault(slide_id, []).append(result["test"][slide_id])
                first_fold.setdefault(slide_id, fold.index)
    ids = [s for fold in repeats[0] for s in fold.test]
    raw = np.array([np.mean(held_out[s], axis=0) for s in ids]).reshape(len(ids), len(cohort.classes))
    y_true = np.array([by_id[s].target for s in ids])
    method, sites = mil["calibration"], [by_id[s].site for s in ids]
    calibration = fit_calibration(method, y_true, raw, sites)
    probs, measured = raw, raw
    if method != "none":
        probs = np.array([calibration.apply(p, site) for p, site in zip(raw, sites)])
        groups = [first_fold[s] for s in ids] if len(repeats[0]) > 1 else [by_id[s].patient_id for s in ids]
        measured = cross_fitted(y_true, raw, groups, method, sites if method == "site" else None)

    reference, ood_oof = fit_out_of_fold(descriptors, [f.test for f in repeats[0]], mil["ood_alpha"])
    reference.save(run_dir)
    rows = [[s, by_id[s].patient_id, by_id[s].label, first_fold[s], *p, cohort.classes[int(np.argmax(p))],
             round(ood_oof[s], 4), ood_oof[s] > 1] for s, p in zip(ids, probs)]
    write_csv(run_dir / "cv_predictions.csv",
              ["slide_id", "patient_id", "label", "fold", *probability_columns(cohort.classes), "predicted",
               "ood_score", "ood"], rows)
    settings = dict(groups=[by_id[s].patient_id for s in ids], sites=sites if any(sites) else None,
                    n_bootstrap=mil["bootstrap"], seed=mil["seed"])
    metrics = classification_metrics(y_true, probs, cohort.classes, **settings)
    if method != "none":
        # only the calibration figures are taken from here: per site, the same figures of the site's slides
        honest = classification_metrics(y_true, measured, cohort.classes, **settings)
        metrics.update({k: honest[k] for k in ("brier", "ece", "max_wrong_confidence", "confident_wrong")})
        for site, figures in (honest.get("per_site") or {}).items():
            metrics["per_site"][site].update({k: figures[k] for k in ("brier", "ece")})
    metrics["repeats"] = len(repeats)
    metrics["calibration"] = {
        **calibration.to_dict(), "temperature": calibration.temperature,
        "measured": (f"cross-fitted: each test fold's slides calibrated by a {method} calibration fitted on the "
                     "other folds' (Brier, ECE, most confident wrong call)") if method != "none" else "uncalibrated",
        "uncalibrated": {"brier": brier(y_true, raw), "ece": ece(y_true, raw), **confident_errors(y_true, raw)}}
    if method == "site":  # what the sites' own fits add to the cohort's one temperature, measured the same way
        cohort_only = cross_fitted(y_true, raw, groups)
        metrics["calibration"]["cohort_temperature"] = {
            "brier": brier(y_true, cohort_only), "ece": ece(y_true, cohort_only),
            **confident_errors(y_true, cohort_only)}
    metrics["ood"] = {"alpha": mil["ood_alpha"], "flagged_out_of_fold": int(sum(v > 1 for v in ood_oof.values())),
                      "slides": len(ood_oof)}
    write_json(run_dir / "metrics.json", metrics)
    plot_roc(y_true, probs, cohort.classes, metrics, run_dir / "roc.png")
    plot_reliability(y_true, measured, metrics, run_dir / "reliability.png")
    ood = {"descriptor": DESCRIPTOR, "file": REFERENCE_FILE, "alpha": mil["ood_alpha"],
           "threshold": reference.threshold, "out_of_fold": ood_oof}
    return metrics, calibration, ood
