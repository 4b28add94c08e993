"""The training loop shared by pre-training and Q-Score-regularised fine-tuning (SPEC section 4).

``loss = loss_ssl - lambda * mean_{i : Q_i < alpha} Q_i`` with ``D`` frozen and ``L_i``
recomputed on every batch. The loop writes resumable checkpoints (atomically) so that a job
re-delivered after its worker died goes on from the last one, reports progress, and stops
between steps when asked to.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from models.data.datasets import make_loader
from models.scoring.qscore import DEFAULT_EPS, q_score, regularizer_term
from models.storage.atomic import atomic_path
from models.training.objectives import SSLMethod

log = logging.getLogger(__name__)


class TrainingCancelled(RuntimeError):
    """Raised between steps when ``should_stop`` answers True."""


@dataclass(frozen=True)
class Regularizer:
    """The Q-Score term of paper eq. 4 on a frozen discriminative set ``D``."""

    discriminative: torch.Tensor
    alpha: float
    weight: float = 0.1  # lambda; the paper's value
    eps: float = DEFAULT_EPS

    def __post_init__(self) -> None:
        if not self.weight >= 0:
            raise ValueError(f"lambda must be non-negative, got {self.weight}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 256
    lr: float = 0.06
    weight_decay: float = 5e-4
    max_steps: int | None = None  # stop early (tests, smoke runs)
    seed: int = 0
    workers: int = 0
    checkpoint_every: int = 50  # steps

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")

    def total_steps(self, n_samples: int) -> int:
        """Steps of a run from the start on ``n_samples``: whole batches per epoch, capped by max_steps."""
        total = n_samples // self.batch_size * self.epochs
        return total if self.max_steps is None else min(total, self.max_steps)


@dataclass
class StepRecord:
    step: int
    epoch: int
    loss: float
    loss_ssl: float
    regularizer: float
    low_quality_share: float
    mean_q: float
    lr: float


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    history: list[StepRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "resumed_from": self.resumed_from, "history": [asdict(r) for r in self.history]}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(
    method: SSLMethod,
    dataset: Dataset,
    config: TrainConfig,
    *,
    device: str | torch.device = "cpu",
    regularizer: Regularizer | None = None,
    checkpoint: str | Path | None = None,
    on_step: Callable[[StepRecord, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train ``method`` on ``dataset`` (which yields ``(views, target)``).

    With ``checkpoint`` set, state is saved there every ``config.checkpoint_every`` steps and
    at the end, and an existing checkpoint is resumed from. ``on_step(record, progress)`` sees
    every step; ``should_stop()`` is asked between steps and ends training with
    :class:`TrainingCancelled`.
    """
    seed_everything(config.seed)
    device = torch.device(device)
    method.to(device).train()
    steps_per_epoch = len(dataset) // config.batch_size  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise ValueError(
            f"the data set has {len(dataset)} samples, fewer than one batch of {config.batch_size}"  # type: ignore[arg-type]
        )
    total = config.total_steps(len(dataset))  # type: ignore[arg-type]
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )
    start = _resume(checkpoint, method, optimizer, scheduler) if checkpoint else 0
    result = TrainResult(steps=start, resumed_from=start)
    d_mask = regularizer.discriminative.to(device) if regularizer else None

    step = start
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        for views, _ in _epoch_batches(dataset, config, epoch, skip):
            if step >= total:
                break
            if should_stop is not None and should_stop():
                if checkpoint:
                    _save(checkpoint, method, optimizer, scheduler, step)
                raise TrainingCancelled(f"training stopped at step {step} of {total}")
            views = [v.to(device, non_blocking=True) for v in views]
            loss_ssl, h = method.forward_views(views)
            loss, reg_value, q = loss_ssl, torch.zeros((), device=device), None
            if regularizer is not None:
                q = q_score(h.float(), d_mask, regularizer.eps)  # type: ignore[arg-type]
                reg_value = regularizer_term(q, regularizer.alpha)
                loss = loss_ssl + regularizer.weight * reg_value
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss.item()} at step {step}; lower the lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            method.after_step(step / total)
            record = StepRecord(
                step=step,
                epoch=epoch,
                loss=loss.item(),
                loss_ssl=loss_ssl.item(),
                regularizer=reg_value.item(),
                low_quality_share=(q < regularizer.alpha).float().mean().item() if q is not None else math.nan,
                mean_q=q.mean().item() if q is not None else math.nan,
                lr=scheduler.get_last_lr()[0],
            )
            result.history.append(record)
            if on_step is not None:
                on_step(record, step / total)
            if checkpoint and step % config.checkpoint_every == 0:
                _save(checkpoint, method, optimizer, scheduler, step)
    result.steps = step
    if checkpoint:
        _save(checkpoint, method, optimizer, scheduler, step)
    method.eval()
    return result


def _epoch_batches(dataset: Dataset, config: TrainConfig, epoch: int, skip: int) -> DataLoader:
    """The batches of ``epoch`` from batch ``skip`` on: a seeded permutation per epoch, so a
    resumed run sees the batches the interrupted one would have, without decoding the skipped."""
    generator = torch.Generator().manual_seed(config.seed * 10_007 + epoch)
    order = torch.randperm(len(dataset), generator=generator)[skip * config.batch_size :]  # type: ignore[arg-type]
    return make_loader(Subset(dataset, order.tolist()), config.batch_size, workers=config.workers, drop_last=True)


def _save(
    path: str | Path,
    method: SSLMethod,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
) -> None:
    state = {
        "method": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _resume(
    path: str | Path,
    method: SSLMethod,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    path = Path(path)
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    method.load_state_dict(state["method"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log.info("resumed training from %s at step %d", path, state["step"])
    return int(state["step"])
