"""All predictors: protocol, shared input validation (and no state change on error), duplicate aggregation,
exact state round trips, the simple predictors' maths, the ridge ablation against scikit-learn, metrics."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vipalloc._io import decode, encode
from vipalloc.predictors import (
    PREDICTOR_NAMES,
    BetaPredictor,
    EmpiricalPredictor,
    GPPredictor,
    OraclePredictor,
    Predictor,
    make_predictor,
)
from vipalloc.predictors.metrics import calibration_metrics, merge_metrics

# every predictor configuration exercised by the generic tests
CONFIGS: dict[str, dict[str, Any]] = {
    "gp": {},
    "gp-paper": {"preset": "paper"},
    "gp-gaussian": {"likelihood": "gaussian", "calibrate": True},
    "beta": {},
    "beta-discount": {"lam": 0.7},
    "empirical": {},
    "ridge": {},
    "oracle": {},
}


def build(config: str, ids: list[str], rng: np.random.Generator) -> Any:
    name = config.split("-")[0]
    pred = make_predictor(name, **CONFIGS[config])
    x = rng.normal(size=(len(ids), 6))
    pred.set_features(ids, x / np.linalg.norm(x, axis=1, keepdims=True))
    if name == "oracle":
        pred.set_true_p(ids, rng.random(len(ids)))
    return pred


def state_bytes(pred: Any) -> str:
    return repr(encode(pred.state_dict()))


def test_registry() -> None:
    assert PREDICTOR_NAMES == ("gp", "beta", "empirical", "ridge", "oracle")
    for name in PREDICTOR_NAMES:
        pred = make_predictor(name)
        assert isinstance(pred, Predictor) and pred.name == name
    assert make_predictor("gp").needs_features and not make_predictor("beta").needs_features
    with pytest.raises(ValueError, match="choose one of: gp, beta, empirical, ridge, oracle"):
        make_predictor("knn")
    with pytest.raises(ValueError, match="bad options for predictor 'beta'"):
        make_predictor("beta", discount=0.5)


BAD_OBSERVATIONS = [
    (["a", "b"], [1], [2, 2], 0, "shape"),
    (["a"], [1.5], [2], 0, "whole numbers"),
    (["a"], [np.nan], [2], 0, "NaN"),
    (["a"], [True], [2], 0, "booleans"),
    (["a"], ["1"], [2], 0, "numeric"),
    (["a"], [3], [2], 0, "successes <= trials"),
    (["a"], [-1], [2], 0, "successes <= trials"),
    (["a"], [0], [0], 0, "trials must be >= 1"),
    (["a"], [1], [2], -1, "step"),
    (["a"], [1], [2], 1.0, "step"),
    ("a", [1], [2], 0, "not a single string"),
]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_bad_input_raises_clearly_and_changes_nothing(config: str) -> None:
    rng = np.random.default_rng(0)
    ids = ["a", "b", "c"]
    pred = build(config, ids, rng)
    pred.observe(["a", "b"], np.array([1, 2]), np.array([4, 4]), 0)
    before = state_bytes(pred)
    for pids, s, t, step, msg in BAD_OBSERVATIONS:
        with pytest.raises(ValueError, match=msg):
            pred.observe(pids, np.array(s), np.array(t), step)
    for feats, msg in ((np.full((1, 6), np.nan), "NaN"), (np.ones((2, 6)), "shape"), (np.ones(6), "shape")):
        with pytest.raises(ValueError, match=msg):
            pred.set_features(["d"], feats)
    with pytest.raises(ValueError, match="step"):
        pred.predict(["a"], -3)
    assert state_bytes(pred) == before


@pytest.mark.parametrize("config", list(CONFIGS))
def test_duplicate_ids_in_one_call_are_aggregated(config: str) -> None:
    ids = ["a", "b", "c"]
    one, two = build(config, ids, np.random.default_rng(1)), build(config, ids, np.random.default_rng(1))
    one.observe(["a", "b", "a"], np.array([1, 0, 2]), np.array([4, 2, 4]), 0)
    two.observe(["a", "b"], np.array([3, 0]), np.array([8, 2]), 0)
    for x, y in zip(one.predict(ids, 1), two.predict(ids, 1)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_state_round_trip_is_bit_exact(config: str) -> None:
    rng = np.random.default_rng(2)
    ids = [f"q{i}" for i in range(15)]
    pred = build(config, ids, rng)
    for step in range(4):
        b = rng.choice(15, 6, replace=False)
        n = rng.integers(1, 9, 6)
        pred.predict(ids, step)
        pred.observe([ids[i] for i in b], rng.binomial(n, 0.5), n, step)
    twin = make_predictor(config.split("-")[0], **CONFIGS[config])
    twin.load_state_dict(decode(encode(pred.state_dict())))
    for a, b in zip(pred.predict(ids + ["q0"], 4), twin.predict(ids + ["q0"], 4)):
        np.testing.assert_array_equal(a, b)


def test_state_with_other_parameters_is_refused() -> None:
    beta = BetaPredictor(lam=0.5)
    with pytest.raises(ValueError, match="same parameters"):
        BetaPredictor().load_state_dict(beta.state_dict())
    with pytest.raises(ValueError, match="same parameters"):
        make_predictor("ridge", alpha=2.0).load_state_dict(make_predictor("ridge").state_dict())


def test_beta_posterior_with_discount() -> None:
    beta = BetaPredictor()
    beta.observe(["a"], np.array([3]), np.array([4]), 0)
    p, s = beta.predict(["a", "unseen"], 1)
    np.testing.assert_allclose(p, [4 / 6, 0.5])
    np.testing.assert_allclose(s, [np.sqrt(4 * 2 / (36 * 7)), np.sqrt(1 / (4 * 3))])
    disc = BetaPredictor(lam=0.5)
    disc.observe(["a"], np.array([4]), np.array([4]), 0)  # alpha = 0.5*1 + 0.5*1 + 4 = 5, beta = 1
    disc.observe(["a"], np.array([0]), np.array([2]), 1)  # alpha = 2.5 + 0.5 = 3, beta = 0.5 + 0.5 + 2 = 3
    assert disc.predict(["a"], 2)[0][0] == pytest.approx(0.5)
    disc.observe(["a"], np.array([2]), np.array([2]), 1)  # same step: counts added, no second discount
    assert disc.predict(["a"], 2)[0][0] == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match="lam"):
        BetaPredictor(lam=0.0)


def test_empirical_keeps_the_latest_step() -> None:
    emp = EmpiricalPredictor()
    emp.observe(["a"], np.array([1]), np.array([4]), 0)
    emp.observe(["a"], np.array([4]), np.array([4]), 2)  # newer step replaces
    assert emp.predict(["a"], 3)[0][0] == pytest.approx(4.5 / 5)
    emp.observe(["a"], np.array([0]), np.array([4]), 2)  # same step adds
    assert emp.predict(["a"], 3)[0][0] == pytest.approx(4.5 / 9)
    emp.observe(["a"], np.array([0]), np.array([4]), 1)  # older step ignored
    assert emp.predict(["a"], 3)[0][0] == pytest.approx(4.5 / 9)
    assert emp.predict(["new"], 3)[0][0] == 0.5


@pytest.mark.parametrize("n_train", [12, 80])  # dual (n < d) and primal closed forms
def test_ridge_matches_scikit_learn(n_train: int) -> None:
    sk = pytest.importorskip("sklearn.linear_model")
    prep = pytest.importorskip("sklearn.preprocessing")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(100, 20))
    x[:, 3] = 1.0  # a constant feature: StandardScaler leaves its scale at 1
    ids = [str(i) for i in range(100)]
    n = rng.integers(1, 9, n_train)
    s = rng.binomial(n, 0.5 + 0.1 * np.tanh(x[:n_train, 0]))
    ridge = make_predictor("ridge")
    ridge.set_features(ids, x)
    ridge.observe(ids[:5], np.array([1] * 5), np.array([1] * 5), 0)  # an older step is replaced by step 1
    ridge.observe(ids[:n_train], s, n, 1)
    scaler = prep.StandardScaler().fit(x[:n_train])
    ref = sk.Ridge(alpha=1.0).fit(scaler.transform(x[:n_train]), s / n)
    expected = np.clip(ref.predict(scaler.transform(x)), 0, 1)
    np.testing.assert_allclose(ridge.predict(ids, 2)[0], expected, atol=1e-9)


def test_oracle() -> None:
    o = OraclePredictor()
    with pytest.raises(ValueError, match="set_true_p"):
        o.predict(["a"], 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        o.set_true_p(["a"], [1.5])
    o.set_true_p(["a", "b"], [0.25, 1.0])
    o.observe(["a"], np.array([0]), np.array([3]), 0)  # ignored
    p, s = o.predict(["b", "a"], 1)
    np.testing.assert_array_equal(p, [1.0, 0.25])
    np.testing.assert_array_equal(s, [0.0, 0.0])
    moving = OraclePredictor(lambda ids, step: np.full(len(ids), min(1.0, 0.1 * step)))
    assert moving.predict(["x"], 3)[0][0] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="callable"):
        OraclePredictor(lambda ids, step: np.full(len(ids), 2.0)).predict(["x"], 0)
    assert OraclePredictor({"k": 0.5}).predict(["k"], 0)[0][0] == 0.5


@settings(max_examples=25, deadline=None)
@given(
    obs=st.lists(
        st.tuples(st.lists(st.integers(0, 7), min_size=1, max_size=5), st.integers(1, 40), st.floats(0, 1)),
        min_size=1,
        max_size=8,
    ),
    config=st.sampled_from(["gp", "gp-paper", "gp-gaussian", "beta-discount", "empirical", "ridge"]),
    gap=st.integers(0, 50),
)
def test_property_predictions_always_valid(obs: list, config: str, gap: int) -> None:
    rng = np.random.default_rng(0)
    ids = [f"q{i}" for i in range(8)]
    pred = build(config, ids, rng)
    for step, (who, n, frac) in enumerate(obs):
        k = len(who)
        pred.observe([ids[i] for i in who], np.full(k, int(round(frac * n))), np.full(k, n), step * (1 + gap))
        p, s = pred.predict(ids, (step + 1) * (1 + gap))
        assert p.dtype == np.float64 and p.shape == s.shape == (8,)
        assert np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))
        assert np.all(np.isfinite(s)) and np.all((s >= 0) & (s <= 0.5))


def test_calibration_metrics() -> None:
    m = calibration_metrics([0.5, 1.0], [1, 4], [2, 4], p_true=[0.5, 0.9])
    assert m["brier"] == pytest.approx((0.25 + 0.0) / 2)
    assert m["log_loss"] == pytest.approx((np.log(2) - np.log(1 - 1e-6)) / 2)
    assert m["mae_rate"] == 0.0 and m["mae_true"] == pytest.approx(0.05)
    assert m["mae_var"] == pytest.approx((0 + 0.09) / 2) and m["count"] == 2
    assert np.isnan(m["spearman_rate"])  # fewer than 3 prompts
    r = calibration_metrics([0.1, 0.5, 0.9, 0.3], [0, 2, 4, 1], [4, 4, 4, 4])
    assert r["spearman_rate"] == pytest.approx(1.0)
    merged = merge_metrics([m, r, calibration_metrics([], [], [])])
    assert merged["count"] == 6 and merged["brier"] == pytest.approx((2 * m["brier"] + 4 * r["brier"]) / 6)
    with pytest.raises(ValueError, match="shape"):
        calibration_metrics([0.5], [1, 1], [2, 2])


def test_gp_is_the_default_and_beats_paper_on_a_small_trace() -> None:
    """A fast version of benchmarks/predictors_quick.py: next-step Brier of the default GP preset beats the
    authors' GP and the Beta baseline on a small synthetic trace (clustered prompts, drifting difficulty)."""
    rng = np.random.default_rng(11)
    n, d, k = 300, 16, 8
    centers = rng.normal(size=(k, d))
    cl = rng.integers(k, size=n)
    x = centers[cl] / np.linalg.norm(centers[cl], axis=1, keepdims=True) + 0.15 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    z0 = rng.normal(-0.5, 1.5, size=k)[cl] + rng.normal(0, 0.7, size=n)
    ids = [f"q{i}" for i in range(n)]
    preds = {"default": GPPredictor(), "paper": GPPredictor("paper"), "beta": BetaPredictor()}
    assert preds["default"].preset == "vipalloc"
    briers: dict[str, list[float]] = {key: [] for key in preds}
    for step in range(12):
        b = rng.choice(n, 60, replace=False)
        m = rng.choice([2, 4, 8], size=60)
        s = rng.binomial(m, 1 / (1 + np.exp(-(z0[b] + 0.1 * step))))
        for key, pred in preds.items():
            pred.set_features([ids[i] for i in b], x[b])
            p = pred.predict([ids[i] for i in b], step)[0]
            if step:
                briers[key].append(calibration_metrics(p, s, m)["brier"])
            pred.observe([ids[i] for i in b], s, m, step)
    mean = {key: float(np.mean(v)) for key, v in briers.items()}
    assert mean["default"] < mean["beta"] < mean["paper"], mean
