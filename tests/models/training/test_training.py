"""Objectives, the training loop, resuming, cancelling and the Q-Score regulariser (SPEC 4)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import Dataset

from models.data.datasets import image_folder
from models.data.transforms import eval_transform
from models.encoders.loading import ImportedEncoder
from models.encoders.resnet import build_encoder
from models.encoders.spec import EncoderSpec
from models.scoring.feature_set import Preprocessing
from models.scoring.qscore import q_score
from models.scoring.representations import extract_representations
from models.training.loop import Regularizer, TrainConfig, TrainingCancelled, train
from models.training.objectives import METHODS, build_method
from models.training.regularize import prepare_regularization


class TwoViews(Dataset):
    """Deterministic two-view samples (no augmentation randomness); records what is read."""

    def __init__(self, n: int = 24, size: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.read.append(int(i))
        x = self.x[i]
        return [x, x.flip(-1) * 0.9 + 0.1], int(i)


def _method(name: str, spec: EncoderSpec, seed: int = 0):
    torch.manual_seed(seed)
    return build_method(name, build_encoder(spec))


def _state(method) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


# --- objectives -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
def test_one_step_of_each_objective(name, tiny_spec):
    method = _method(name, tiny_spec)
    method.train()
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)]
    loss, h = method.forward_views(views)
    assert loss.dim() == 0 and bool(torch.isfinite(loss))
    # MoCo's key view goes through the momentum encoder: only the query view's h is returned
    assert h.shape == ((8 if name == "moco_v2" else 16), tiny_spec.feature_dim)
    before = method.encoder.resnet.conv1.weight.detach().clone()
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    loss.backward()
    opt.step()
    method.after_step(0.5)
    assert not torch.equal(before, method.encoder.resnet.conv1.weight)
    # the view transform yields two views of the encoder's input size
    from PIL import Image

    out = method.view_transform(tiny_spec)(Image.new("RGB", (40, 40), (120, 30, 200)))
    assert len(out) == 2 and all(v.shape == (3, 32, 32) for v in out)


def test_momentum_encoders_are_not_trained(tiny_spec):
    for name in ("moco_v2", "byol"):
        method = _method(name, tiny_spec)
        assert not any(p.requires_grad for p in method.encoder_momentum.parameters())
        assert all(p.requires_grad for p in method.encoder.parameters())


def test_build_method_unknown():
    with pytest.raises(
        ValueError,
        match=r"unknown method 'dino'; choose one of \['byol', 'moco_v2', 'simclr', 'swav'\]",
    ):
        build_method("dino", build_encoder(width=4))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_regularized_loss_differs_by_lambda_times_term(name, tiny_spec):
    r = tiny_spec.feature_dim
    config = TrainConfig(batch_size=8, max_steps=1, lr=0.01, seed=0)

    def run(weight: float):
        # D = every feature, eps 1 and alpha 1: every sample with evidence is below alpha
        reg = Regularizer(torch.arange(r), alpha=1.0, weight=weight, eps=1.0)
        return train(_method(name, tiny_spec), TwoViews(16), config, regularizer=reg).history[0]

    control, regularized = run(0.0), run(0.5)
    assert control.loss_ssl == pytest.approx(regularized.loss_ssl, rel=1e-6)
    assert regularized.regularizer < 0  # -mean Q of low-quality samples
    assert control.regularizer == pytest.approx(regularized.regularizer, rel=1e-5)
    assert regularized.loss - control.loss == pytest.approx(0.5 * regularized.regularizer, rel=1e-4, abs=1e-6)
    assert regularized.loss == pytest.approx(regularized.loss_ssl + 0.5 * regularized.regularizer, rel=1e-6)
    assert regularized.low_quality_share == 1.0
    assert regularized.mean_q == pytest.approx(-regularized.regularizer, rel=1e-5)


def test_regularizer_and_config_validation():
    with pytest.raises(ValueError, match="lambda must be non-negative, got -1"):
        Regularizer(torch.arange(3), alpha=0.1, weight=-1.0)
    with pytest.raises(ValueError, match="alpha must be positive, got 0"):
        Regularizer(torch.arange(3), alpha=0.0)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr must be positive"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="max_steps must be at least 1"):
        TrainConfig(max_steps=0)


def test_train_refuses_data_smaller_than_a_batch(tiny_spec):
    with pytest.raises(ValueError, match="the data set has 4 samples, fewer than one batch of 8"):
        train(_method("simclr", tiny_spec), TwoViews(4), TrainConfig(batch_size=8, max_steps=1))


# --- resuming and cancelling -------------------------------------------------------------

# 24 samples, batches of 8: 3 steps per epoch; 3 epochs capped at 7 steps, cut after step 4
# (epoch 1, one batch in), so the resumed run starts mid-epoch.
RESUME_CONFIG = TrainConfig(epochs=3, batch_size=8, max_steps=7, lr=0.05, seed=3, checkpoint_every=2)


def test_resume_reproduces_an_uninterrupted_run(tiny_spec, tmp_path):
    data_full = TwoViews(24)
    full_method = _method("simclr", tiny_spec)
    full = train(full_method, data_full, RESUME_CONFIG, checkpoint=tmp_path / "full.ckpt")
    assert full.steps == 7 and full.resumed_from == 0

    data_cut = TwoViews(24)
    cut_method = _method("simclr", tiny_spec)
    done: list[int] = []
    with pytest.raises(TrainingCancelled, match="stopped at step 4 of 7"):
        train(
            cut_method,
            data_cut,
            RESUME_CONFIG,
            checkpoint=tmp_path / "cut.ckpt",
            on_step=lambda record, progress: done.append(record.step),
            should_stop=lambda: len(done) >= 4,
        )
    assert done == [1, 2, 3, 4]
    saved = torch.load(tmp_path / "cut.ckpt", weights_only=True)
    assert saved["step"] == 4
    # the first 4 steps read the same samples in the same order
    assert data_cut.read == data_full.read[: len(data_cut.read)]

    data_resumed = TwoViews(24)
    resumed_method = _method("simclr", tiny_spec, seed=99)  # other init: the checkpoint decides
    resumed = train(resumed_method, data_resumed, RESUME_CONFIG, checkpoint=tmp_path / "cut.ckpt")
    assert resumed.resumed_from == 4 and resumed.steps == 7
    assert [r.step for r in resumed.history] == [5, 6, 7]
    # the resumed run goes on with the batches the uninterrupted one saw at steps 5-7
    # (steps 5-7, plus one batch the loader hands over before the loop sees it is done: both
    # runs read it, so the tails compare)
    assert len(data_resumed.read) == 4 * 8
    assert data_resumed.read == data_full.read[-len(data_resumed.read) :]
    # ... and, without augmentation randomness, ends on the same weights
    for (k, a), (k2, b) in zip(_state(full_method).items(), _state(resumed_method).items(), strict=True):
        assert k == k2
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), k
    for a, b in zip(full.history[4:], resumed.history, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
        assert a.lr == pytest.approx(b.lr)


def test_finished_checkpoint_is_not_trained_again(tiny_spec, tmp_path):
    config = TrainConfig(batch_size=8, max_steps=2, lr=0.05, seed=0)
    method = _method("simclr", tiny_spec)
    train(method, TwoViews(16), config, checkpoint=tmp_path / "c.ckpt")
    again = train(_method("simclr", tiny_spec), TwoViews(16), config, checkpoint=tmp_path / "c.ckpt")
    assert again.resumed_from == 2 and again.history == []


def test_should_stop_before_the_first_step_leaves_a_checkpoint(tiny_spec, tmp_path):
    with pytest.raises(TrainingCancelled, match="stopped at step 0 of 2"):
        train(
            _method("byol", tiny_spec),
            TwoViews(16),
            TrainConfig(batch_size=8, max_steps=2),
            checkpoint=tmp_path / "c.ckpt",
            should_stop=lambda: True,
        )
    assert torch.load(tmp_path / "c.ckpt", weights_only=True)["step"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]  # written atomically


def test_should_stop_without_checkpoint_still_cancels(tiny_spec):
    with pytest.raises(TrainingCancelled):
        train(
            _method("simclr", tiny_spec),
            TwoViews(16),
            TrainConfig(batch_size=8, max_steps=2),
            should_stop=lambda: True,
        )


# --- the regulariser raises low Q-Scores (paper eq. 4) ----------------------------------------


def test_regularizer_raises_q_of_low_quality_samples(tiny_model, tiny_spec, cifar_slice):
    """Same steps, same seed, with and without the term; Q measured on fixed images.

    On this width-8, untrained encoder, Q-Scores are about 0.03 (r = 64, dense h), so the term
    is small next to NT-Xent (about 4): lambda = 100 makes its gradient count. Measured on the
    slice: low-quality mean Q 0.034 (control) vs 0.053 (regularised) after 5 steps at lr 0.05;
    the gap holds for lr 0.02-0.1 and 3-5 steps.
    """
    encoder, _, fs = tiny_model
    d, eps, alpha = fs.discriminative_indices, fs.eps, fs.alpha
    images = image_folder(cifar_slice / "train", eval_transform(tiny_spec))
    h0, _ = extract_representations(encoder, images, batch_size=150)
    q0 = q_score(h0, d, eps)
    low = q0 < alpha
    assert 10 <= int(low.sum()) < len(q0)

    def low_q_after(weight: float) -> float:
        enc = copy.deepcopy(encoder)
        torch.manual_seed(0)
        method = build_method("simclr", enc)
        views = image_folder(cifar_slice / "train", method.view_transform(tiny_spec))
        train(
            method,
            views,
            TrainConfig(batch_size=64, max_steps=4, lr=0.05, seed=0),
            regularizer=Regularizer(d, alpha=alpha, weight=weight, eps=eps),
        )
        h, _ = extract_representations(enc, images, batch_size=150)
        return float(q_score(h, d, eps)[low].mean())

    control, regularized = low_q_after(0.0), low_q_after(100.0)
    assert regularized > control * 1.1, (control, regularized)
    assert regularized > float(q0[low].mean())


# --- the set-up `qscore regularize` and the regularize job share ------------------------------


def test_prepare_regularization_builds_the_run_on_the_feature_set(tiny_model, cifar_slice):
    encoder, digest, fs = tiny_model
    imported = ImportedEncoder(copy.deepcopy(encoder), digest, "test")
    run = prepare_regularization(
        imported, fs, cifar_slice / "train", name="tiny", lambda_=0.5, epochs=2, batch_size=64, seed=3
    )
    assert torch.equal(run.regularizer.discriminative, fs.discriminative_indices)
    assert (run.regularizer.alpha, run.regularizer.weight, run.regularizer.eps) == (fs.alpha, 0.5, fs.eps)
    assert run.method.encoder is imported.encoder and run.method.training
    assert (run.config.epochs, run.config.batch_size, run.config.seed, run.config.lr) == (2, 64, 3, 0.03)
    assert len(run.dataset) == 300 and run.total_steps == 300 // 64 * 2 == 8
    views, _ = run.dataset[0]
    assert len(views) == 2 and views[0].shape == (3, 32, 32)  # SimCLR's two augmented views
    capped = prepare_regularization(
        imported, fs, cifar_slice / "train", name="tiny", alpha=0.01, batch_size=64, max_steps=3
    )
    assert capped.regularizer.alpha == 0.01 and capped.total_steps == 3


def test_prepare_regularization_refuses_what_does_not_fit(tiny_model, cifar_slice):
    encoder, digest, fs = tiny_model
    data = cifar_slice / "train"
    with pytest.raises(ValueError, match=r"was found on encoder .*, but model .other. is 000000000000"):
        prepare_regularization(ImportedEncoder(encoder, "0" * 64, "test"), fs, data, name="other")
    resized = fs.model_copy(deep=True)
    resized.encoder.preprocessing = Preprocessing(image_size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="found on images preprocessed with --image-size 64"):
        prepare_regularization(ImportedEncoder(encoder, digest, "test"), resized, data, name="tiny")
    with pytest.raises(ValueError, match="unknown method 'dino'"):
        prepare_regularization(ImportedEncoder(encoder, digest, "test"), fs, data, name="tiny", method="dino")
    with pytest.raises(ValueError, match="lr must be positive"):
        prepare_regularization(ImportedEncoder(encoder, digest, "test"), fs, data, name="tiny", lr=0.0)
