import numpy as np
import pytest

from fleetlm.route.data import import_routellm, score_matrix
from fleetlm.route.metrics import apgr
from fleetlm.route.routers import ROUTERS, RouterError, load_router, make_router
from route_synth import STRONG, WEAK, make_routellm_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import os

    cache = tmp_path_factory.mktemp("emb")
    os.environ["FLEETLM_EMBED_CACHE"] = str(cache)  # tests never write to the user's cache
    os.environ["HF_HUB_OFFLINE"] = "1"
    return make_routellm_folder(tmp_path_factory.mktemp("src"), per_subject=60, gsm_rows=160)


def _split(rows):
    return rows[::2], rows[1::2]


@pytest.mark.parametrize("kind", ["knn", "logistic", "mlp", "mf", "gbm", "ensemble"])
def test_prompt_routers_learn_which_subject_needs_strong(folder, tmp_path, kind):
    rows = import_routellm(folder, "mmlu")
    train, test = _split(rows)
    router = make_router(kind).fit(train)
    pred = router.score(test)
    assert pred.shape == (len(test), 2) and ((pred >= 0) & (pred <= 1)).all()
    y = score_matrix(test, [STRONG, WEAK])
    signal = pred[:, router.models.index(STRONG)] - pred[:, router.models.index(WEAK)]
    assert apgr(signal, y[:, 0], y[:, 1]) > 0.6  # the hard subject is sent to the strong model first
    # the saved router scores exactly as the fitted one
    back = load_router(router.save(tmp_path / kind))
    assert np.allclose(back.score(test), pred, atol=1e-5)


def test_random_router_is_deterministic_and_uninformed(folder):
    rows = import_routellm(folder, "mmlu")
    r = make_router("random", seed=3).fit(rows)
    a, b = r.score(rows), r.score(rows)
    assert np.array_equal(a, b)
    y = score_matrix(rows, [STRONG, WEAK])
    assert abs(apgr(a[:, 1] - a[:, 0], y[:, 0], y[:, 1]) - 0.5) < 0.15


def test_cascade_uses_the_cheap_models_response(folder, tmp_path):
    rows = import_routellm(folder, "gsm8k")
    train, test = _split(rows)
    router = make_router("cascade", use_embedding=False).fit(train)
    assert router.cheap == WEAK  # the weaker model in training is the cheap one
    pred = router.score(test)
    y = score_matrix(test, [STRONG, WEAK])
    signal = pred[:, router.models.index(STRONG)] - pred[:, router.models.index(WEAK)]
    # the weak model's wrong answers carry an arithmetic slip: the calculator finds them all
    assert apgr(signal, y[:, 0], y[:, 1]) > 0.85
    back = load_router(router.save(tmp_path / "c"))
    assert np.allclose(back.score(test), pred, atol=1e-5)
    for r in test:
        r.responses = None
    with pytest.raises(RouterError, match="needs the response"):
        router.score(test)


def test_registry_and_errors(tmp_path):
    assert set(ROUTERS) == {"random", "knn", "logistic", "mlp", "mf", "cascade", "gbm", "ensemble"}
    with pytest.raises(RouterError, match="unknown router"):
        make_router("magic")
    with pytest.raises(RouterError, match="bad settings"):
        make_router("knn", nope=1)
    with pytest.raises(RouterError, match="not fitted"):
        make_router("knn").score([])
    with pytest.raises(RouterError, match="no router.json"):
        load_router(tmp_path)
    with pytest.raises(RouterError, match="member"):
        make_router("ensemble", members=[])


def test_gbm_trees_match_sklearn_and_need_no_embedding(folder):
    from sklearn.ensemble import HistGradientBoostingClassifier

    from fleetlm.route.features import prompt_features

    rows = import_routellm(folder, "mmlu")
    router = make_router("gbm", min_leaf=5, trees=30).fit(rows)
    assert router.embedder is None and not router.use_embedding  # the gateway loads no MiniLM for it
    x = np.stack([prompt_features(r.prompt) for r in rows]).astype(np.float64)
    labels = score_matrix(rows, [STRONG])[:, 0].astype(int)
    ref = HistGradientBoostingClassifier(
        max_iter=30,
        learning_rate=0.05,
        max_depth=3,
        min_samples_leaf=5,
        l2_regularization=1.0,
        early_stopping=False,
        random_state=0,
    ).fit(x, labels)
    # our flat-array tree walk gives sklearn's probabilities
    assert np.allclose(
        router.score(rows)[:, router.models.index(STRONG)], ref.predict_proba(x)[:, 1], atol=1e-6
    )
    # a model right on every training row gets a constant, not an error
    for r in rows:
        r.scores[WEAK] = 1.0
    const_router = make_router("gbm").fit(rows)
    const = const_router.score(rows[:3])[:, const_router.models.index(WEAK)]
    assert np.allclose(const, const[0]) and const[0] > 0.99


def test_ensemble_is_the_mean_of_its_members(folder, tmp_path):
    rows = import_routellm(folder, "mmlu")
    train, test = _split(rows)
    ens = make_router("ensemble", members=["gbm", "knn"], member_settings={"gbm": {"min_leaf": 5}}).fit(train)
    gbm = make_router("gbm", min_leaf=5).fit(train)
    knn = make_router("knn").fit(train)
    assert np.allclose(ens.score(test), (gbm.score(test) + knn.score(test)) / 2, atol=1e-6)
    back = load_router(ens.save(tmp_path / "e"))
    assert np.allclose(back.score(test), ens.score(test), atol=1e-6)
