"""Q-Score-regularised fine-tuning of an encoder (paper eq. 4): the set-up that ``qscore
regularize`` and the regularize job share.

:func:`prepare_regularization` checks that the feature set was found on this encoder (same
weights, same preprocessing) and that the encoder can be trained, then builds the
self-supervised objective around it, the augmented data set, the Q-Score term on the feature
set's ``D`` and the training configuration; :meth:`Regularization.run` trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from models.data.datasets import image_folder
from models.encoders.loading import ImportedEncoder
from models.scoring.compatibility import check_fits
from models.scoring.feature_set import FeatureSet
from models.training.loop import Regularizer, StepRecord, TrainConfig, TrainResult, train
from models.training.objectives import SSLMethod, build_method


@dataclass(frozen=True)
class Regularization:
    """A fine-tuning set up: the objective (wrapping the encoder, trained in place), its data,
    the Q-Score term and the configuration."""

    method: SSLMethod
    dataset: Dataset
    regularizer: Regularizer
    config: TrainConfig

    @property
    def total_steps(self) -> int:
        """Steps the run takes from the start (whole batches per epoch, capped by max_steps)."""
        return self.config.total_steps(len(self.dataset))  # type: ignore[arg-type]

    def run(
        self,
        *,
        device: str | torch.device = "cpu",
        checkpoint: str | Path | None = None,
        on_step: Callable[[StepRecord, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainResult:
        """Train (resuming from ``checkpoint`` when it exists); see :func:`models.training.loop.train`."""
        return train(
            self.method,
            self.dataset,
            self.config,
            device=device,
            regularizer=self.regularizer,
            checkpoint=checkpoint,
            on_step=on_step,
            should_stop=should_stop,
        )


def prepare_regularization(
    imported: ImportedEncoder,
    feature_set: FeatureSet | str | Path,
    data: str | Path,
    *,
    name: str,
    method: str = "simclr",
    lambda_: float = 0.1,
    alpha: float | None = None,
    epochs: int = 1,
    batch_size: int = 256,
    lr: float = 0.03,
    max_steps: int | None = None,
    seed: int = 0,
    workers: int = 0,
    checkpoint_every: int = 50,
) -> Regularization:
    """Set up the fine-tuning of ``imported`` on the image folder ``data`` under ``feature_set``
    (a feature set, or the path of its JSON file).

    ``feature_set``: the feature set, or the path of its JSON (read once the encoder is found
    trainable, so that is what an export is told first). ``name`` says which encoder it is in
    error messages (a path, a registry version). ``alpha`` defaults to the feature set's. Raises
    ``ValueError`` when the encoder cannot be trained (a TorchScript export), when the feature set
    was found on other weights or other preprocessing, or for an unknown method or a bad training
    parameter.
    """
    encoder = imported.encoder
    reason = encoder.not_trainable_reason()
    if reason is not None:
        raise ValueError(f"cannot regularize {name}: {reason}")
    if not isinstance(feature_set, FeatureSet):  # a path: read only once the encoder is known to be trainable
        feature_set = FeatureSet.load(feature_set)
    check_fits(feature_set, imported.fingerprint, encoder.spec, model=name)
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        max_steps=max_steps,
        seed=seed,
        workers=workers,
        checkpoint_every=checkpoint_every,
    )
    regularizer = Regularizer(feature_set.discriminative_indices, alpha or feature_set.alpha, lambda_, feature_set.eps)
    ssl = build_method(method, encoder)
    ssl.train()
    dataset = image_folder(data, transform=ssl.view_transform(encoder.spec))
    return Regularization(method=ssl, dataset=dataset, regularizer=regularizer, config=config)
