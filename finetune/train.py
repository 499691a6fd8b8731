"""The fine-tune loop: one head (and, unless frozen, one encoder copy) per property.

    fit(config, data, backbone) → FitResult
        normaliser   mean/std of the training targets (stored with the head)
        batches      train: records shuffled per epoch (seeded) and collated with the encoder's
                     views, from PDD rows and neighbour lists computed once (`cache_views`);
                     val/test: collated once and kept (their order never changes)
        frozen mode  the encoder runs once per training batch and its per-atom latents are
                     cached, so a linear/MLP probe trains at the speed of the head alone
        step         MSE on normalised targets (missing labels masked), AdamW, warmup + cosine
        epoch end    validation MAE/RMSE/R² in physical units; the best-validation weights are
                     kept (and restored at the end); early stopping after `patience` epochs
                     without a better validation MAE (`epochs` is the maximum); a non-finite
                     training loss stops the run at once (`diverged`: a too-large learning rate)
        end          test metrics and predictions with the best weights
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from crystalfm_common.metrics import grouped, metric_name
from data_pipeline.load.collate import BatchViews, NeighborCache, collate, with_pdd
from finetune.backbone import Backbone, views_for
from finetune.config import FinetuneConfig
from finetune.data import TaskData, target_of
from finetune.heads import PropertyHead, PropertyModel, TargetNormalizer


@dataclass
class Predictions:
    keys: list[str]
    y_true: np.ndarray  # [B] physical units
    y_pred: np.ndarray  # [B]


@dataclass
class FitResult:
    model: PropertyModel
    views: BatchViews
    history: list[dict] = field(default_factory=list)  # one dict of metrics per epoch
    best_epoch: int = 0
    val: dict = field(default_factory=dict)  # metrics of the restored best weights
    test: dict = field(default_factory=dict)
    test_predictions: Predictions | None = None
    train_seconds: float = 0.0
    epochs_run: int = 0  # < config.epochs when early stopping (or divergence) ended the run
    diverged: bool = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and R² over the finite labels (physical units)."""
    mask = np.isfinite(y_true)
    y_true, y_pred = y_true[mask], y_pred[mask]
    if y_true.size == 0:
        return {"mae": math.nan, "rmse": math.nan, "r2": math.nan, "count": 0}
    err = y_pred - y_true
    ss_tot = float(((y_true - y_true.mean()) ** 2).sum())
    r2 = 1.0 - float((err**2).sum()) / ss_tot if ss_tot > 0 else math.nan
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean())), "r2": r2, "count": int(y_true.size)}


class TargetCollate:
    """records → (CrystalBatch, y [B]); a top-level class so DataLoader workers can pickle it.
    `neighbors`: a NeighborCache for the views' rule, so no epoch searches neighbours again."""

    def __init__(self, views: BatchViews, target: str, neighbors: NeighborCache | None = None):
        self.views, self.target, self.neighbors = views, target, neighbors

    def __call__(self, records):
        batch = collate(records, self.views, neighbors=self.neighbors)
        y = torch.tensor([target_of(r, self.target) for r in records], dtype=torch.float32)  # [B]
        return batch, y


# ---------------------------------------------------------------------------------------------- fit
def build_model(config: FinetuneConfig, backbone: Backbone, normalizer: TargetNormalizer, target: str | None = None) -> PropertyModel:
    prior = _prior_head(config, backbone, target)
    head = PropertyHead(backbone.encoder.out_dim, config.readout, config.head_layers, config.dropout,
                        prior_hidden=None if prior is None else int(prior.mlp[0].out_features))
    if prior is not None:
        head.set_prior(prior.mlp, prior.config.scale, normalizer)
    return PropertyModel(backbone.encoder, head, normalizer, frozen=config.mode == "frozen")


def _prior_head(config: FinetuneConfig, backbone: Backbone, target: str | None):
    """The pretraining property head `head_init: property_head` starts from, checked against the task."""
    if config.head_init != "property_head":
        return None
    prior = backbone.property_head
    if prior is None:
        raise ValueError(
            f"head_init: property_head needs a release pretrained with a property head (objective.property_head); "
            f"{backbone.info.get('release_dir', backbone.label)} has none — use head_init: random"
        )
    if target is not None and prior.config.label != target:
        raise ValueError(
            f"head_init: property_head: the release's pretraining head predicts '{prior.config.label}', "
            f"the task's target is '{target}' — use head_init: random for this task"
        )
    if config.readout != "mean":
        raise ValueError("head_init: property_head needs readout: mean (the pretraining head reads the mean embedding)")
    return prior


def fit(
    config: FinetuneConfig,
    data: TaskData,
    backbone: Backbone,
    *,
    on_epoch: Callable[[int, dict], None] | None = None,
    progress: bool = True,
) -> FitResult:
    seed_everything(config.seed)
    device = pick_device(config.device)
    views = views_for(backbone.encoder)
    target = data.task.target
    normalizer = TargetNormalizer.fit(torch.tensor(data.targets("train"), dtype=torch.float64), config.normalize)
    model = build_model(config, backbone, normalizer, target).to(device)
    collate_fn = TargetCollate(views, target)
    train_records, train_collate = data.train, collate_fn
    if config.cache_views and config.mode != "frozen":  # frozen mode collates its batches once anyway
        train_records, train_collate = cache_views(data.train, views, target)

    train_batches = _train_batches(config, train_records, train_collate)
    val_batches = _fixed_batches(data.val, collate_fn, config.batch_size)  # collated once, kept
    steps_per_epoch = max(1, math.ceil(len(data.train) / config.batch_size))
    optimizer = _optimizer(config, model)
    scheduler = _scheduler(config, optimizer, steps_per_epoch)
    feature_cache: dict[int, tuple] = {}

    result = FitResult(model=model, views=views)
    best_mae, best_state, stale = math.inf, None, 0
    start = time.perf_counter()
    epochs = range(1, config.epochs + 1)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc=f"{data.task.name} {backbone.label} {config.mode}", unit="epoch", leave=False)
    for epoch in epochs:
        t0 = time.perf_counter()
        train_loss, seen = _train_epoch(model, train_batches(epoch), optimizer, scheduler, config, device, feature_cache)
        seconds = time.perf_counter() - t0
        val_metrics = evaluate(model, val_batches, device)[0] if val_batches else {}
        # Without a validation split the best epoch is chosen on the training loss.
        score = val_metrics["mae"] if val_batches else train_loss
        record = {  # the names MLflow shows (crystalfm_common/metrics.py)
            metric_name("train", "loss"): train_loss,
            metric_name("train", "lr"): optimizer.param_groups[0]["lr"],
            **grouped("val", val_metrics, skip=("count",)),
            metric_name("throughput", "epoch_seconds"): seconds,
            metric_name("throughput", "crystals_per_s"): seen / max(seconds, 1e-9),
        }
        result.history.append(record)
        result.epochs_run = epoch
        if on_epoch is not None:
            on_epoch(epoch, record)
        if not math.isfinite(train_loss):
            result.diverged = True  # nothing after this can recover: stop, keep the best epoch so far
            break
        if score < best_mae:
            best_mae, stale, result.best_epoch = score, 0, epoch
            best_state = copy.deepcopy({k: v.detach().to("cpu") for k, v in model.state_dict().items()})
        else:
            stale += 1
            if config.patience is not None and stale >= config.patience:
                break
    result.train_seconds = time.perf_counter() - start
    if best_state is not None:
        model.load_state_dict(best_state)
    if val_batches:
        result.val, _ = evaluate(model, val_batches, device)
    test_batches = _fixed_batches(data.test, collate_fn, config.batch_size)
    if test_batches:
        result.test, result.test_predictions = evaluate(model, test_batches, device)
    return result


def cache_views(records: Sequence, views: BatchViews, target: str) -> tuple[list, TargetCollate]:
    """The training crystals' view inputs, computed once before the first epoch: records that carry
    their PDD rows, and a collate holding every crystal's neighbour list, so later epochs only
    concatenate. The batches are the ones the per-batch path builds, number for number (tested)."""
    records = list(records)
    if views.pdd_k is not None:
        records = [with_pdd(r, views.pdd_k) for r in records]
    neighbors = NeighborCache(views.graph, records) if views.graph is not None else None
    return records, TargetCollate(views, target, neighbors)


def _train_batches(config: FinetuneConfig, records: Sequence, collate_fn: TargetCollate):
    """epoch → iterable of (index, batch, y). Frozen mode uses fixed batches (their latents are
    cached) in a shuffled order; otherwise records are reshuffled every epoch."""
    if config.mode == "frozen":
        fixed = _fixed_batches(records, collate_fn, config.batch_size, shuffle_seed=config.seed)

        def frozen_epoch(epoch: int):
            order = np.random.default_rng([config.seed, epoch]).permutation(len(fixed))
            return ((int(i), *fixed[i]) for i in order)

        return frozen_epoch

    def epoch_batches(epoch: int):
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        loader = DataLoader(
            list(records),
            batch_size=config.batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=collate_fn,
            num_workers=config.num_workers,
            drop_last=False,
        )
        return ((None, batch, y) for batch, y in loader)

    return epoch_batches


def _fixed_batches(records: Sequence, collate_fn, batch_size: int, shuffle_seed: int | None = None) -> list:
    records = list(records)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(records))
        records = [records[i] for i in order]
    return [collate_fn(records[i : i + batch_size]) for i in range(0, len(records), batch_size)]


def _optimizer(config: FinetuneConfig, model: PropertyModel) -> torch.optim.Optimizer:
    groups = [{"params": list(model.head.parameters()), "lr": config.lr}]
    if config.mode != "frozen":
        encoder_lr = config.encoder_lr if (config.encoder_lr is not None and config.mode == "full") else config.lr
        groups.append({"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": encoder_lr})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def _scheduler(config: FinetuneConfig, optimizer, steps_per_epoch: int):
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train_epoch(model, batches, optimizer, scheduler, config, device, feature_cache) -> tuple[float, int]:
    model.train()
    total_loss, total_count, seen = 0.0, 0, 0
    for index, batch, y in batches:
        y = y.to(device)
        mask = torch.isfinite(y)  # [B] missing labels carry no loss
        if not bool(mask.any()):
            continue
        if model.frozen:
            if index not in feature_cache:  # the frozen encoder is deterministic: run it once
                batch = batch.to(device)
                feature_cache[index] = (model.encode(batch).detach(), batch.batch_index, batch.num_atoms)
            h, batch_index, num_atoms = feature_cache[index]
            pred = model.head(h, batch_index, num_atoms)  # [B]
        else:
            pred = model(batch.to(device))  # [B]
        target = model.normalizer.normalize(y)
        loss = torch.nn.functional.mse_loss(pred[mask], target[mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.grad_clip)
        optimizer.step()
        scheduler.step()
        count = int(mask.sum())
        total_loss += float(loss.detach()) * count
        total_count += count
        seen += int(y.shape[0])
    return total_loss / max(total_count, 1), seen


@torch.no_grad()
def evaluate(model: PropertyModel, batches: list, device) -> tuple[dict, Predictions]:
    model.eval()
    keys, trues, preds = [], [], []
    for batch, y in batches:
        preds.append(model.predict(batch.to(device)).double().cpu().numpy())
        trues.append(y.double().numpy())
        keys += list(batch.keys)
    y_true, y_pred = np.concatenate(trues), np.concatenate(preds)
    return regression_metrics(y_true, y_pred), Predictions(keys, y_true, y_pred)
