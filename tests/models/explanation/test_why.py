"""Why a typicality and a risk are what they are (models/explanation/why.py): exact parts of each verdict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.encoders.loading import load_encoder
from models.explanation.why import why
from models.scoring.feature_set import FeatureSet
from models.scoring.risk import RiskModel
from models.scoring.scorer import Scorer
from models.scoring.typicality import ComponentScale, TypicalityModel

WEIGHTS = Path(__file__).resolve().parents[3] / "models" / "weights"


def test_component_typicality_by_hand() -> None:
    model = TypicalityModel(
        components={
            "log_l1": ComponentScale(center=1.0, upper=2.0, lower=0.5),
            "hoyer": ComponentScale(center=0.0, upper=4.0),
        },
        threshold=2.0,
        threshold_source="hand",
        reference_atypical_share=0.01,
        n_bank=0,
        n_calibration=10,
    )
    sig = {"log_l1": np.array([5.0, 0.0]), "hoyer": np.array([4.0, -8.0])}
    parts = model.component_typicality(sig)
    # log_l1: (5 - 1) / 2 = 2 and (1 - 0) / 0.5 = 2 on the lower side; hoyer: 4 / 4 = 1 and -8 / 4 = -2; over 2
    np.testing.assert_allclose(parts["log_l1"], [1.0, 1.0])
    np.testing.assert_allclose(parts["hoyer"], [0.5, -1.0])
    np.testing.assert_allclose(np.maximum(parts["log_l1"], parts["hoyer"]), model.typicality(sig))


def test_risk_contributions_by_hand() -> None:
    model = RiskModel(
        signals=["a", "b"],
        mean=[1.0, 0.0],
        scale=[2.0, 1.0],
        coef=[0.5, 1.0],
        intercept=0.25,
        lower=[-3.0, None],
        upper=[3.0, None],
        monotone=["b"],
        no_class_coef=[1.0, 0.0],
        no_class_intercept=-2.0,
        source="hand",
        n_train=0,
    )
    sig = {"a": np.array([9.0]), "b": np.array([-2.0])}
    parts = model.contributions(sig)
    # a is clipped to 3: z = (3 - 1) / 2 = 1; b is monotone, never clipped: z = -2
    np.testing.assert_allclose(parts["z"], [[1.0, -2.0]])
    np.testing.assert_allclose(parts["of_a_class"], [[0.5, -2.0]])
    np.testing.assert_allclose(parts["no_class"], [[1.0, 0.0]])
    np.testing.assert_allclose(model.intercept + parts["of_a_class"].sum(1), model.decision(sig))
    np.testing.assert_allclose(
        1 / (1 + np.exp(-(model.no_class_intercept + parts["no_class"].sum(1)))), model.predict_no_class(sig)
    )


@pytest.fixture(scope="module")
def demo_scorer() -> Scorer:
    imported = load_encoder(WEIGHTS / "demo-encoder.safetensors")
    return Scorer(imported.encoder, imported.fingerprint, FeatureSet.load(WEIGHTS / "demo-feature-set.json"), "cpu")


def test_the_parts_make_up_the_served_verdicts(demo_scorer: Scorer, cifar_slice: Path) -> None:
    """On real and shifted images: the largest component is the typicality, the two probabilities
    make the risk, the terms and the intercept make the decision value."""
    fs = demo_scorer.feature_set
    files = sorted((cifar_slice / "test").glob("*/*.jpg"))[:40]
    images = [Image.open(f).convert("RGB") for f in files]
    images += [im.point(lambda v: v // 8) for im in images[:10]] + [Image.new("RGB", (32, 32), (255, 0, 0))]
    pixels = [demo_scorer.preprocess(im) for im in images]
    inference = demo_scorer.infer(pixels)
    verdicts = demo_scorer.postprocess(inference, features=False)
    sig = demo_scorer.signals(inference)[1]
    seen_atypical = False
    for i, verdict in enumerate(verdicts):
        reasons = why(fs, sig, i)
        components = reasons.typicality.components
        assert max(components.values()) == pytest.approx(verdict.typicality, rel=1e-9)
        assert verdict.atypical == any(v > 1 for v in components.values())
        seen_atypical |= verdict.atypical
        r = reasons.risk
        assert 1 - (1 - r.of_a_class) * (1 - r.no_class) == pytest.approx(verdict.risk, abs=1e-9)
        decision = r.intercept + sum(s["of_a_class"] for s in r.signals)
        assert decision == pytest.approx(float(fs.risk_model.decision({k: v[i : i + 1] for k, v in sig.items()})[0]))
        assert [s["name"] for s in r.signals] != [] and {s["name"] for s in r.signals} == set(fs.risk_model.signals)
        sizes = [abs(s["of_a_class"]) + abs(s["no_class"]) for s in r.signals]
        assert sizes == sorted(sizes, reverse=True)
    assert seen_atypical  # the dark copies and the solid colour


def test_no_models_no_parts(tiny_model: tuple) -> None:
    _, _, feature_set = tiny_model
    bare = feature_set.model_copy(update={"typicality": None, "risk_model": None})
    reasons = why(bare, {"q_score": np.zeros(1)})
    assert reasons.row() == {"typicality": None, "risk": None}
