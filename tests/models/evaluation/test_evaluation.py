"""Linear evaluation, Q-Score power, compression and calibration (SPEC section 5)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.data.datasets import image_folder, random_sample
from models.evaluation.linear_eval import _target_score, best_weight, choose_estimator, run_evaluation
from models.evaluation.metrics import calibrate_alpha, compression_curve, linear_probe, score_power
from models.evaluation.shift_fit import CLEAN_WEIGHTS, SignalSet, with_mmd2
from models.monitoring.drift import DriftReference
from models.monitoring.image_properties import PROPERTIES, image_properties
from models.scoring.error_estimate import ErrorEstimator, fit_atc, fit_cott
from models.scoring.scorer import Scorer

# --- score_power ---------------------------------------------------------------------------


def test_score_power_perfect_separation():
    scores = np.array([0.9, 0.8, 0.2, 0.1])
    correct = np.array([True, True, False, False])
    power = score_power(scores, correct)
    assert power["auroc"] == 1.0 and power["auprc"] == 1.0
    assert power["base_rate"] == 0.5
    assert power["auroc_misclassified"] == 1.0 and power["auprc_misclassified"] == 1.0
    assert power["base_rate_misclassified"] == 0.5
    reversed_power = score_power(-scores, correct)
    assert reversed_power["auroc"] == 0.0


def test_score_power_hand_case():
    # correct samples score 0.35 and 0.8, mis-classified 0.1 and 0.4.
    # pairs (correct, wrong): (0.35, 0.1) win, (0.35, 0.4) loss, (0.8, 0.1) win, (0.8, 0.4) win
    # -> AUROC = 3 / 4; the other orientation ranks the same pairs: 3 / 4.
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    correct = np.array([False, False, True, True])
    power = score_power(scores, correct)
    assert power["auroc"] == pytest.approx(0.75)
    assert power["auroc_misclassified"] == pytest.approx(0.75)
    # AUPRC (average precision), positives = correct, ranked 0.8 (c), 0.4 (w), 0.35 (c), 0.1 (w):
    # recall 0.5 at precision 1, recall 1 at precision 2/3 -> 0.5 * 1 + 0.5 * 2/3 = 0.8333
    assert power["auprc"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # 3 correct out of 4 -> base rate for a 3:1 case
    assert score_power(np.array([1.0, 2.0, 3.0, 0.5]), np.array([True, True, True, False]))["base_rate"] == 0.75


def test_score_power_errors():
    with pytest.raises(ValueError, match="both correct and mis-classified"):
        score_power(np.array([0.1, 0.2]), np.array([True, True]))
    with pytest.raises(ValueError, match="both correct and mis-classified"):
        score_power(np.array([0.1, 0.2]), np.array([False, False]))
    with pytest.raises(ValueError, match="3 scores for 2 correctness labels"):
        score_power(np.array([0.1, 0.2, 0.3]), np.array([True, False]))


# --- linear_probe --------------------------------------------------------------------------


def _blobs(n_per_class=40, r=10, classes=3, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, r)) * 3
    x = np.concatenate([c + spread * rng.normal(size=(n_per_class, r)) for c in centres])
    y = np.repeat(np.arange(classes), n_per_class)
    return x.astype(np.float32), y


def test_linear_probe_separates_easy_problem():
    xtr, ytr = _blobs(seed=0)
    rng = np.random.default_rng(5)
    xte = xtr + 0.1 * rng.normal(size=xtr.shape).astype(np.float32)
    result = linear_probe(torch.from_numpy(xtr), torch.from_numpy(ytr), xte, ytr)
    assert result.top1 == 1.0
    assert result.correct.all()
    assert result.predictions.tolist() == ytr.tolist()
    assert ((result.max_probability > 1 / 3) & (result.max_probability <= 1)).all()


def test_linear_probe_on_feature_subset_and_errors():
    xtr, ytr = _blobs(r=6)
    # a probe on one pure-noise feature does worse than on all features
    noise = np.random.default_rng(1).normal(size=(len(xtr), 1)).astype(np.float32)
    x = np.concatenate([xtr, noise], axis=1)
    assert linear_probe(x, ytr, x, ytr, features=[6]).top1 < 0.7
    assert linear_probe(x, ytr, x, ytr, features=[0, 1, 2, 3, 4, 5]).top1 == 1.0
    with pytest.raises(ValueError, match="at least two classes"):
        linear_probe(xtr, np.zeros(len(xtr)), xtr, ytr)
    with pytest.raises(ValueError, match="feature subset is empty"):
        linear_probe(xtr, ytr, xtr, ytr, features=[])
    with pytest.raises(ValueError, match=r"\(N, r\) alike"):
        linear_probe(xtr, ytr, xtr[:, :3], ytr)
    with pytest.raises(ValueError, match="exactly one label"):
        linear_probe(xtr, ytr[:-1], xtr, ytr)


# --- compression ---------------------------------------------------------------------------


def test_compression_curve_returns_every_subset_kind():
    xtr, ytr = _blobs(n_per_class=20, r=16, seed=2, spread=1.0)
    xte, yte = _blobs(n_per_class=10, r=16, seed=2, spread=1.0)
    counts = [0, 0, 5, 1, 7, 3, 9, 2, 8, 4, 6, 0, 11, 10, 12, 13]
    points = compression_curve(xtr, ytr, xte, yte, counts, fractions=(0.25, 0.5), random_seeds=2, max_iter=200)
    kinds = {p.subset for p in points}
    assert kinds == {"all", "discriminative", "random", "lower_tail", "upper_tail"}
    assert [(p.subset, p.size) for p in points if p.subset == "all"] == [("all", 16)]
    for size in (4, 8):
        at = [p for p in points if p.size == size]
        assert sorted(p.subset for p in at) == [
            "discriminative",
            "lower_tail",
            "random",
            "random",
            "upper_tail",
        ]
        assert sorted(p.seed for p in at if p.subset == "random") == [0, 1]
    assert all(0.0 <= p.top1 <= 1.0 for p in points)


def test_compression_curve_skips_discriminative_larger_than_ever_dominant():
    xtr, ytr = _blobs(n_per_class=10, r=8, seed=3)
    counts = [0, 0, 0, 0, 0, 0, 1, 2]  # only 2 features ever dominant
    points = compression_curve(xtr, ytr, xtr, ytr, counts, fractions=(0.25, 0.5), random_seeds=1, max_iter=100)
    assert [p.size for p in points if p.subset == "discriminative"] == [2]


# --- calibration ---------------------------------------------------------------------------


def test_calibrate_alpha_youden_hand_case():
    q = np.array([0.0, 0.0, 0.1, 0.2, 0.5, 0.6])
    correct = np.array([False, False, False, True, True, True])
    alpha, source = calibrate_alpha(q, correct)
    # flagging q < alpha separates perfectly when 0.1 < alpha <= 0.2
    assert 0.1 < alpha <= 0.2
    assert ((q < alpha) == ~correct).all()
    assert "Youden" in source


def test_calibrate_alpha_is_positive_and_flags_every_zero():
    rng = np.random.default_rng(0)
    q = np.concatenate([np.zeros(30), rng.uniform(0, 0.1, 70)])
    correct = rng.uniform(size=100) < 0.3 + 5 * q  # higher Q, more often correct
    alpha, _ = calibrate_alpha(q, correct)
    assert alpha > 0
    assert (q[q == 0] < alpha).all()
    # all-zero Q: alpha still > 0, so everything is flagged
    alpha0, _ = calibrate_alpha(np.zeros(10), np.array([True, False] * 5))
    assert alpha0 > 0


def test_calibrate_alpha_target_precision():
    q = np.array([0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5])
    correct = np.array([False, False, True, False, True, True, True])
    # q < 0.1: 2 wrong of 2 (precision 1); q < 0.2: 2 of 3; q < 0.3: 3 of 4 (0.75)
    alpha, source = calibrate_alpha(q, correct, target_precision=0.75)
    assert alpha == pytest.approx(0.3)
    assert "precision >= 0.75" in source
    alpha, _ = calibrate_alpha(q, correct, target_precision=1.0)
    assert alpha == pytest.approx(0.1)


def test_calibrate_alpha_errors():
    with pytest.raises(ValueError, match="both correct and mis-classified"):
        calibrate_alpha(np.array([0.1, 0.2]), np.array([True, True]))


# --- run_evaluation: the encoder stays frozen ----------------------------------------------


def test_run_evaluation_keeps_encoder_frozen(tiny_model, cifar_slice):
    encoder, digest, fs = tiny_model
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    progress: list[float] = []
    report, calibrated = run_evaluation(
        encoder,
        digest,
        fs,
        cifar_slice / "train",
        cifar_slice / "test",
        train_samples=150,
        test_samples=60,
        batch_size=64,
        compression=False,
        shift_samples=12,
        shift_families=("contrast", "gaussian_noise"),
        shift_severities=(1, 5),
        on_progress=progress.append,
    )
    after = encoder.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats too
    assert report["n_train"] == 150 and report["n_test"] == 60
    assert 0.0 <= report["top1"] <= 1.0
    assert set(report["q_score"]) >= {"auroc", "auprc", "base_rate", "auroc_misclassified"}
    assert report["alpha"] > 0 and calibrated.alpha == report["alpha"]
    # one notion of risk: the calibrated model of models/scoring/risk.py, over the label-free signals
    assert calibrated.risk_model is not None and calibrated.risk_curve is None
    assert {"q_score", "knn", "log_typicality", "probe_max_softmax"} <= set(calibrated.risk_model.signals)
    assert calibrated.risk_model.monotone == ["log_typicality"]
    # the probe is the head: its accuracy on the test sample is the report's top-1
    assert calibrated.head is not None and calibrated.head.top1 == report["top1"]
    assert calibrated.head.classes == sorted(p.name for p in (cifar_slice / "test").iterdir())
    # shifted copies: 2 families x 2 severities, inversion, grayscale, 3 gross sets of 12 images each
    subsets = report["risk"]["subsets"]
    assert subsets["clean"]["n"] == 60 and subsets["shifted"]["n"] == 12 * 6 and subsets["gross"]["n"] == 36
    assert subsets["gross/glyphs"]["error"] == 1.0  # images of no class count as mis-classified
    assert report["risk"]["n"] == 60 + 12 * 9
    assert calibrated.error_estimator is not None
    assert calibrated.error_estimator.method == report["error_estimate"]["method"]
    assert {r["set"] for r in report["error_estimate"]["sets"]} == set(subsets) - {"clean", "shifted", "gross"}
    # every candidate estimated every shifted set: the head's probabilities went with each
    assert all(r["cott"] is not None and r["atc"] is not None for r in report["error_estimate"]["sets"])
    assert set(report["error_estimate"]["mean_abs_error"]) == {"mean_risk", "atc", "cott"}
    # the set-level correction by each set's MMD^2 against the bank: judged with each family left out
    correction = report["error_estimate"]["correction"]
    assert correction["uncorrected"] == pytest.approx(
        report["error_estimate"]["mean_abs_error"][report["error_estimate"]["method"]]
    )
    assert correction["kept"] == (calibrated.error_estimator.correction is not None)
    assert correction["kept"] == (correction["corrected_leave_one_family_out"] < correction["uncorrected"])
    served = correction["corrected_leave_one_family_out"] if correction["kept"] else correction["uncorrected"]
    assert report["error_estimate"]["window_error"] == served
    # the clean share of the weight: each tried, the one whose cross-validated figures best meet the targets kept
    tried = report["risk"]["clean_weight_scores"]
    assert set(tried) == {str(w) for w in CLEAN_WEIGHTS}
    assert tried[str(report["risk"]["clean_weight"])]["score"] == min(t["score"] for t in tried.values())
    chosen = tried[str(report["risk"]["clean_weight"])]
    assert chosen["ece_clean"] == report["risk"]["subsets"]["clean"]["ece"]
    assert chosen["score"] == pytest.approx(
        max(chosen["ece_clean"] / 0.03, chosen["ece_shifted"] / 0.08, chosen["window_error"] / 0.05)
    )
    assert set(report["risk"]["per_signal"]) == set(calibrated.risk_model.signals)
    assert 0.0 <= report["risk"]["combined"]["ece"] <= 1.0
    assert set(report["risk"]["probe_max_softmax"]) == {"auroc", "auprc"}
    assert calibrated.bank is fs.bank is not None  # the bank goes with the calibrated copy
    assert calibrated.discriminative == fs.discriminative and calibrated.eps == fs.eps
    assert "compression" not in report
    assert progress[-1] == 1.0 and progress == sorted(progress)
    # the held-out images' typicality, sorted, for the drift test: the same images as the report's share
    held_out = np.array(calibrated.typicality.held_out)
    assert held_out.shape == (60,) and np.all(np.diff(held_out) >= 0)
    assert (held_out > 1).mean() == pytest.approx(report["atypical_share_test"])
    assert calibrated.typicality.model_dump(exclude={"held_out"}) == fs.typicality.model_dump(exclude={"held_out"})
    # and their image properties, sorted, for the drift test of the inputs: those of the same images
    properties = calibrated.held_out_image_properties
    assert properties is not None and list(properties) == list(PROPERTIES)
    test = image_folder(cifar_slice / "test")
    scorer = Scorer(encoder, digest, fs, "cpu")
    pixels = [scorer.preprocess(test[i][0].convert("RGB")) for i in random_sample(len(test), 60, 0).indices]
    want = image_properties(pixels)
    for k, name in enumerate(PROPERTIES):
        np.testing.assert_allclose(properties[name], np.sort(want[k]), rtol=1e-4)
    # the feature set given is left as it was
    assert fs.risk_model is None and fs.typicality.held_out is None and fs.held_out_image_properties is None


def test_run_evaluation_refuses_foreign_feature_set(tiny_model, cifar_slice):
    encoder, _, fs = tiny_model
    with pytest.raises(ValueError, match="but this encoder is"):
        run_evaluation(encoder, "0" * 64, fs, cifar_slice / "train", cifar_slice / "test")


# --- choosing the error estimator ----------------------------------------------------------------


def _set(name: str, kind: str, predicted: np.ndarray, labels: np.ndarray, confidence: float) -> SignalSet:
    """n images of 4 classes, each predicted ``predicted`` with max softmax ``confidence``."""
    n = len(labels)
    p = np.full((n, 4), (1 - confidence) / 3)
    p[np.arange(n), predicted] = confidence
    sig = {"probe_max_softmax": p.max(axis=1), "probe_prediction": predicted}
    return SignalSet(name, kind, None, None, sig, predicted != labels, np.arange(n), None, p, labels)


def test_choose_estimator_takes_cott_where_a_shift_piles_confident_predictions_onto_one_class() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    clean_pred = np.where(rng.uniform(size=200) < 0.8, labels, (labels + 1) % 4)  # error ~0.2
    clean = _set("clean", "clean", clean_pred, labels, 0.9)
    # a shift that sends three quarters of the images to class 0, as confident as before:
    # the confidence (ATC) and a risk that reads it see nothing; the class mix gives it away
    piled = np.where(rng.uniform(size=200) < 0.75, 0, clean_pred)
    shifted = _set("piled", "corruption", piled, labels, 0.9)
    subsets = {"clean": {"mean_risk": 0.2}, "piled": {"mean_risk": 0.2}}
    candidates = {"atc": fit_atc(clean.signals["probe_max_softmax"], ~clean.misclassified),
                  "cott": fit_cott(clean.probabilities, labels)}  # fmt: skip
    chosen, report = choose_estimator([clean, shifted], subsets, candidates)
    assert chosen.method == "cott" and report["method"] == "cott"
    (row,) = report["sets"]
    assert row["error"] > 0.6 and row["cott"] > 0.6 and row["atc"] < 0.4
    assert report["mean_abs_error"]["cott"] == pytest.approx(abs(row["cott"] - row["error"]))
    assert chosen.threshold == candidates["cott"].threshold and chosen.source.startswith("cott: ")
    # sets without the head's probabilities: COTT cannot be compared, so it is not chosen
    bare = SignalSet("piled", "corruption", None, None, shifted.signals, shifted.misclassified, shifted.source)
    chosen, report = choose_estimator([clean, bare], subsets, candidates)
    assert chosen.method != "cott" and report["mean_abs_error"]["cott"] is None
    # no shifted sets: the mean risk
    chosen, _ = choose_estimator([clean], subsets, candidates)
    assert chosen == ErrorEstimator(method="mean_risk", source="mean risk (no shifted sets)")


def test_choose_estimator_keeps_a_set_correction_where_the_mmd2_explains_the_misses() -> None:
    """The mean risk under-estimates each shifted set by half its MMD^2: corrected, leave one family out."""
    rng = np.random.default_rng(1)
    sets, subsets = [], {}
    for i, (family, mmd2) in enumerate([("clean", 0.0)] + [(f"f{k}", m) for k in range(6) for m in (0.1, 0.3, 0.6)]):
        error = 0.2 + 0.5 * mmd2
        miss = np.arange(200) < round(200 * error)
        name = "clean" if family == "clean" else f"{family}/{i}"
        kind = "clean" if family == "clean" else "corruption"
        signals = {"probe_max_softmax": rng.uniform(size=200)}
        family_of = None if kind == "clean" else family
        sets.append(SignalSet(name, kind, family_of, None, signals, miss, np.arange(200), mmd2=mmd2))
        subsets[name] = {"mean_risk": 0.2}  # blind to the shift
    chosen, report = choose_estimator(sets, subsets, {})
    assert chosen.method == "mean_risk" and chosen.correction is not None
    assert report["correction"]["kept"] and report["correction"]["uncorrected"] == pytest.approx(
        np.mean([0.5 * m for _ in range(6) for m in (0.1, 0.3, 0.6)]), abs=0.003
    )
    assert report["window_error"] == report["correction"]["corrected_leave_one_family_out"] < 0.005
    assert chosen.estimate(np.array([0.2]), None, mmd2=0.4) == pytest.approx(0.4, abs=0.005)
    # without every set's MMD^2 there is nothing to fit
    sets[3] = dataclasses.replace(sets[3], mmd2=None)
    chosen, report = choose_estimator(sets, subsets, {})
    assert chosen.correction is None and "correction" not in report
    assert report["window_error"] == report["mean_abs_error"]["mean_risk"]


def test_target_score_and_the_weight_choice_hand_case() -> None:
    subsets = {"clean": {"ece": 0.015}, "shifted": {"ece": 0.04}}
    estimate = {"method": "cott", "mean_abs_error": {"cott": 0.06, "mean_risk": 0.01}, "window_error": 0.06}
    score = _target_score(subsets, estimate)
    # ratios 0.5, 0.5 and 1.2 (the chosen estimator's error, not the others')
    assert score == pytest.approx({"ece_clean": 0.015, "ece_shifted": 0.04, "window_error": 0.06,
                                   "score": 1.2, "mean_ratio": 2.2 / 3})  # fmt: skip
    tie = {
        0.5: {"score": 1.2, "mean_ratio": 0.9},
        0.6: {"score": 1.2, "mean_ratio": 0.8},
        0.7: {"score": 1.3, "mean_ratio": 0.1},
    }
    assert best_weight(tie) == 0.6  # the least score first, then the least mean ratio
    assert best_weight({0.7: {"score": 1.0, "mean_ratio": 1.0}, 0.5: {"score": 1.0, "mean_ratio": 1.0}}) == 0.5


def test_with_mmd2_measures_each_set_against_the_bank_as_the_monitor_does() -> None:
    rng = np.random.default_rng(2)
    reference = DriftReference(rng.normal(size=(300, 5)), size=100)
    near, far = rng.normal(size=(60, 5)), rng.normal(size=(60, 5)) + np.array([3.0, 0, 0, 0, 0])
    sets = [SignalSet(name, "corruption", name, 1, {}, np.zeros(60, bool), np.arange(60), h)
            for name, h in (("near", near), ("far", far))]  # fmt: skip
    kept, dropped = with_mmd2(sets, reference), with_mmd2(sets, reference, drop_h=True)
    unit = near / np.linalg.norm(near, axis=1, keepdims=True)  # the bank's normalisation
    assert kept[0].mmd2 == pytest.approx(reference.mmd2(unit), rel=1e-6) and kept[0].h is near
    assert dropped[1].h is None and dropped[1].mmd2 == kept[1].mmd2 > kept[0].mmd2
    assert sets[0].mmd2 is None  # the sets given are left as they were
    with pytest.raises(ValueError, match="set 'near' kept no representations"):
        with_mmd2(dropped[:1], reference)
