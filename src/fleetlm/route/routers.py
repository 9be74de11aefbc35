"""Routers: one interface, fit(rows) then score(rows) -> predicted quality per model, and a registry.

A router is saved as DIR/router.json (kind, models, settings) + DIR/arrays.npz (plain numpy weights):
no pickle, so loading a router never runs code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fleetlm.errors import FleetError
from fleetlm.route.data import RouteRow, model_names, score_matrix
from fleetlm.route.features import Embedder, prompt_features, response_features


class RouterError(FleetError):
    """A router that is unknown, not fitted, or saved in a form we cannot read."""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


@dataclass
class Router:
    """Base: subclasses set `kind` and implement _fit/_score; `models` is fixed by fit."""

    models: list[str] = field(default_factory=list)
    seed: int = 0
    kind = "base"
    needs_responses = False

    def __post_init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.embedder: Embedder | None = None
        self.mean_quality: dict[str, float] = {}  # each model's mean outcome on the training rows

    def embed(self, rows: list[RouteRow]) -> np.ndarray:
        if self.embedder is None:
            self.embedder = Embedder()
        return self.embedder([r.prompt for r in rows])

    def fit(self, rows: list[RouteRow]) -> Router:
        if not rows:
            raise RouterError("cannot fit a router on no rows")
        self.models = model_names(rows)
        y = score_matrix(rows, self.models)
        self.mean_quality = {m: float(q) for m, q in zip(self.models, y.mean(0), strict=True)}
        self._fit(rows, y)
        return self

    def score(self, rows: list[RouteRow]) -> np.ndarray:
        """Predicted quality in [0, 1], shape [len(rows), len(models)]."""
        if not self.models:
            raise RouterError("router is not fitted")
        if not rows:
            return np.zeros((0, len(self.models)), dtype=np.float32)
        return np.asarray(self._score(rows), dtype=np.float32)

    def _fit(self, rows: list[RouteRow], y: np.ndarray) -> None:
        raise NotImplementedError

    def _score(self, rows: list[RouteRow]) -> np.ndarray:
        raise NotImplementedError

    def settings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "models"}

    def _restore(self) -> None:
        """Called by load_router once models and arrays are set (for routers that hold more than arrays)."""

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "models": self.models, "settings": self.settings(),
                "mean_quality": self.mean_quality}
        (out / "router.json").write_text(json.dumps(meta, indent=2) + "\n")
        np.savez(out / "arrays.npz", **self.arrays)
        return out


class RandomRouter(Router):
    """Ignores the prompt: the baseline every router must beat (APGR ~ 0.5)."""

    kind = "random"

    def _fit(self, rows, y):
        self.arrays["mean"] = y.mean(0)

    def _score(self, rows):
        # A per-prompt seed from the id: the same prompt always gets the same draw.
        out = np.empty((len(rows), len(self.models)), dtype=np.float32)
        for i, r in enumerate(rows):
            digest = hashlib.sha256(f"{self.seed}\0{r.id}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            out[i] = rng.random(len(self.models))
        return out


@dataclass
class KNNRouter(Router):
    """Mean outcome of the k most similar training prompts (cosine), shrunk toward the global mean."""

    k: int = 40
    prior: float = 5.0
    kind = "knn"

    def _fit(self, rows, y):
        self.arrays.update(emb=self.embed(rows), y=y, mean=y.mean(0))

    def _score(self, rows):
        emb, y, mean = self.arrays["emb"], self.arrays["y"], self.arrays["mean"]
        sims = self.embed(rows) @ emb.T
        k = min(self.k, len(emb))
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        return (y[idx].sum(1) + self.prior * mean) / (k + self.prior)


def _standardize_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(0)
    sd = x.std(0) + 1e-6
    return mu, sd


@dataclass
class LogisticRouter(Router):
    """One L2-regularised logistic regression per model on [embedding, prompt surface features]."""

    c: float = 0.5
    surface_features: bool = True  # append prompt_features() to the embedding
    kind = "logistic"

    def _x(self, rows):
        if not self.surface_features:
            return self.embed(rows)
        return np.hstack([self.embed(rows), np.stack([prompt_features(r.prompt) for r in rows])])

    def _fit(self, rows, y):
        from sklearn.linear_model import LogisticRegression

        x = self._x(rows)
        mu, sd = _standardize_fit(x)
        x = (x - mu) / sd
        coefs, bias = [], []
        for j in range(y.shape[1]):
            labels = (y[:, j] >= 0.5).astype(int)
            if labels.min() == labels.max():  # one class only: predict the constant
                coefs.append(np.zeros(x.shape[1]))
                p = np.clip(labels.mean(), 1e-3, 1 - 1e-3)
                bias.append(np.log(p / (1 - p)))
                continue
            clf = LogisticRegression(C=self.c, max_iter=2000).fit(x, labels)
            coefs.append(clf.coef_[0])
            bias.append(clf.intercept_[0])
        self.arrays.update(mu=mu, sd=sd, w=np.array(coefs, dtype=np.float32).T, b=np.array(bias, np.float32))

    def _score(self, rows):
        a = self.arrays
        x = (self._x(rows) - a["mu"]) / a["sd"]
        return _sigmoid(x @ a["w"] + a["b"])


def _torch_fit(net, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, wd: float, seed: int):
    import torch

    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(128):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net


@dataclass
class MLPRouter(Router):
    """A small MLP head on [embedding, prompt features], one logit per model, trained with BCE in torch."""

    hidden: int = 64
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.05
    dropout: float = 0.2
    kind = "mlp"

    def _x(self, rows):
        return np.hstack([self.embed(rows), np.stack([prompt_features(r.prompt) for r in rows])])

    def _fit(self, rows, y):
        import torch
        from torch import nn

        x = self._x(rows)
        mu, sd = _standardize_fit(x)
        torch.manual_seed(self.seed)
        net = nn.Sequential(
            nn.Dropout(self.dropout),
            nn.Linear(x.shape[1], self.hidden),
            nn.GELU(),
            nn.Linear(self.hidden, y.shape[1]),
        )
        net.train()
        _torch_fit(net, (x - mu) / sd, y, self.epochs, self.lr, self.weight_decay, self.seed)
        self.arrays.update(
            mu=mu,
            sd=sd,
            w1=net[1].weight.detach().numpy().T.copy(),
            b1=net[1].bias.detach().numpy().copy(),
            w2=net[3].weight.detach().numpy().T.copy(),
            b2=net[3].bias.detach().numpy().copy(),
        )

    def _score(self, rows):
        a = self.arrays
        x = (self._x(rows) - a["mu"]) / a["sd"]
        h = x @ a["w1"] + a["b1"]
        h = 0.5 * h * (1.0 + _erf(h / np.sqrt(2.0)))  # exact GELU, same as torch's default
        return _sigmoid(h @ a["w2"] + a["b2"])


def _erf(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return erf(x)


@dataclass
class MFRouter(Router):
    """Matrix factorisation of prompt x model (RouteLLM's mf): logit = w . (v_model * P emb) + b_model."""

    dim: int = 32
    epochs: int = 40
    lr: float = 3e-3
    weight_decay: float = 0.05
    kind = "mf"

    def _fit(self, rows, y):
        import torch
        from torch import nn

        x = self.embed(rows)
        m = y.shape[1]
        torch.manual_seed(self.seed)

        class MF(nn.Module):
            def __init__(self, d_in: int, dim: int, n_models: int) -> None:
                super().__init__()
                self.proj = nn.Linear(d_in, dim, bias=False)
                self.model_emb = nn.Parameter(torch.randn(n_models, dim) * 0.1)
                self.out = nn.Linear(dim, 1, bias=False)
                self.bias = nn.Parameter(torch.zeros(n_models))

            def forward(self, e):  # [B, d_in] -> [B, n_models]
                q = self.proj(e)
                return self.out(q[:, None, :] * self.model_emb[None]).squeeze(-1) + self.bias

        net = _torch_fit(
            MF(x.shape[1], self.dim, m), x, y, self.epochs, self.lr, self.weight_decay, self.seed
        )
        self.arrays.update(
            proj=net.proj.weight.detach().numpy().T.copy(),
            model_emb=net.model_emb.detach().numpy().copy(),
            out=net.out.weight.detach().numpy()[0].copy(),
            bias=net.bias.detach().numpy().copy(),
        )

    def _score(self, rows):
        a = self.arrays
        q = self.embed(rows) @ a["proj"]
        return _sigmoid((q[:, None, :] * a["model_emb"][None] * a["out"]).sum(-1) + a["bias"])


@dataclass
class CascadeRouter(Router):
    """FrugalGPT-style cascade: the cheap model answers first; checks on its response predict whether
    that answer is right. The cheap model's predicted quality is P(cheap answer right | prompt, response);
    others get their training mean, so `strong - cheap` orders prompts by the need to escalate."""

    cheap: str = ""
    c: float = 0.3
    # Off by default: on GSM8K (525 training rows) 384 embedding dimensions overfit and cost about 0.03-0.08
    # APGR against the response checks alone (bench/route_eval.py; docs/ROUTING.md).
    use_embedding: bool = False
    kind = "cascade"
    needs_responses = True

    def _x(self, rows):
        missing = [r.id for r in rows if not r.responses or self.cheap not in r.responses]
        if missing:
            raise RouterError(f"cascade needs the response of {self.cheap!r}; row {missing[0]} has none")
        feats = np.stack([response_features(r.prompt, r.responses[self.cheap]) for r in rows])
        parts = [feats, np.stack([prompt_features(r.prompt) for r in rows])]
        if self.use_embedding:
            parts.append(self.embed(rows))
        return np.hstack(parts)

    def _fit(self, rows, y):
        from sklearn.linear_model import LogisticRegression

        if not self.cheap:
            self.cheap = self.models[int(np.argmin(y.mean(0)))]  # the weakest model is taken as the cheap one
        if self.cheap not in self.models:
            raise RouterError(f"cheap model {self.cheap!r} is not among {self.models}")
        j = self.models.index(self.cheap)
        x = self._x(rows)
        mu, sd = _standardize_fit(x)
        labels = (y[:, j] >= 0.5).astype(int)
        if labels.min() == labels.max():
            raise RouterError("cascade needs both right and wrong answers of the cheap model to fit")
        clf = LogisticRegression(C=self.c, max_iter=3000).fit((x - mu) / sd, labels)
        self.arrays.update(
            mu=mu, sd=sd, w=clf.coef_[0].astype(np.float32), b=np.float32(clf.intercept_[0]), mean=y.mean(0)
        )

    def _score(self, rows):
        a = self.arrays
        out = np.tile(a["mean"], (len(rows), 1))
        x = self._x(rows)
        if x.shape[1] != a["mu"].shape[0]:
            raise RouterError(
                f"this cascade was fitted on {a['mu'].shape[0]} features; this version computes "
                f"{x.shape[1]}: refit it"
            )
        x = (x - a["mu"]) / a["sd"]
        out[:, self.models.index(self.cheap)] = _sigmoid(x @ a["w"] + a["b"])
        return out


def _export_trees(clf, prefix: str) -> dict[str, np.ndarray]:
    """A fitted HistGradientBoostingClassifier (binary) as flat node arrays: saved without pickle, and
    predicted by `_trees_logit` in a few vectorised steps. Nodes of all trees are concatenated."""
    names = ("feature", "threshold", "left", "right", "leaf", "value", "missing_left")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    roots, offset = [], 0
    for iteration in clf._predictors:  # binary classification: one tree per boosting iteration
        nodes = iteration[0].nodes
        if nodes["is_categorical"].any():
            raise RouterError("categorical splits are not supported in saved trees")
        roots.append(offset)
        parts["feature"].append(nodes["feature_idx"].astype(np.int32))
        parts["threshold"].append(nodes["num_threshold"].astype(np.float64))
        parts["left"].append(nodes["left"].astype(np.int32) + offset)
        parts["right"].append(nodes["right"].astype(np.int32) + offset)
        parts["leaf"].append(nodes["is_leaf"].astype(bool))
        parts["value"].append(nodes["value"].astype(np.float64))
        parts["missing_left"].append(nodes["missing_go_to_left"].astype(bool))
        offset += len(nodes)
    out = {f"{prefix}{k}": np.concatenate(v) for k, v in parts.items()}
    out[f"{prefix}roots"] = np.asarray(roots, dtype=np.int32)
    out[f"{prefix}baseline"] = np.asarray(clf._baseline_prediction, dtype=np.float64).reshape(-1)[:1]
    return out


def _trees_logit(x: np.ndarray, a: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    """Sum of the trees' leaf values for each row of x (all rows and trees walked together)."""
    roots = a[f"{prefix}roots"]
    baseline = float(a[f"{prefix}baseline"][0])
    if len(roots) == 0:
        return np.full(len(x), baseline)
    feature, threshold = a[f"{prefix}feature"], a[f"{prefix}threshold"]
    left, right, leaf = a[f"{prefix}left"], a[f"{prefix}right"], a[f"{prefix}leaf"]
    missing_left = a[f"{prefix}missing_left"]
    idx = np.tile(roots, (len(x), 1))
    rows = np.arange(len(x))[:, None]
    while not leaf[idx].all():  # at most the trees' depth steps
        v = x[rows, feature[idx]]
        go_left = np.where(np.isnan(v), missing_left[idx], v <= threshold[idx])
        idx = np.where(leaf[idx], idx, np.where(go_left, left[idx], right[idx]))
    return baseline + a[f"{prefix}value"][idx].sum(1)


@dataclass
class GBMRouter(Router):
    """Gradient-boosted trees on the prompt's surface features (length, the shape of its options, math,
    negation, a passage to read): what kind of task a prompt is transfers to unseen subjects better than
    what it is about. Needs no embedding, so it scores a prompt in well under a millisecond."""

    trees: int = 150
    depth: int = 3
    learning_rate: float = 0.05
    min_leaf: int = 50  # at most: small data gets leaves of max(5, 5% of the rows)
    l2: float = 1.0
    kind = "gbm"
    use_embedding = False  # read by the gateway: no MiniLM to load for this router

    def _x(self, rows):
        return np.stack([prompt_features(r.prompt) for r in rows]).astype(np.float64)

    def _fit(self, rows, y):
        from sklearn.ensemble import HistGradientBoostingClassifier

        x = self._x(rows)
        for j in range(y.shape[1]):
            labels = (y[:, j] >= 0.5).astype(int)
            if labels.min() == labels.max():  # one class only: no trees, the constant
                p = np.clip(labels.mean(), 1e-3, 1 - 1e-3)
                self.arrays[f"t{j}.roots"] = np.zeros(0, np.int32)
                self.arrays[f"t{j}.baseline"] = np.array([np.log(p / (1 - p))])
                continue
            clf = HistGradientBoostingClassifier(
                max_iter=self.trees,
                learning_rate=self.learning_rate,
                max_depth=self.depth,
                min_samples_leaf=min(self.min_leaf, max(5, len(x) // 20)),
                l2_regularization=self.l2,
                early_stopping=False,
                random_state=self.seed,
            ).fit(x, labels)
            self.arrays.update(_export_trees(clf, f"t{j}."))

    def _score(self, rows):
        x = self._x(rows)
        return np.stack(
            [_sigmoid(_trees_logit(x, self.arrays, f"t{j}.")) for j in range(len(self.models))], 1
        )


@dataclass
class EnsembleRouter(Router):
    """The mean predicted quality of several routers. The default pairs trees on surface features (the
    kind of task) with a logistic head on the embedding (the topic): their errors differ, so the mean
    ranks held-out prompts better than either alone."""

    members: list[str] = field(default_factory=lambda: ["gbm", "logistic"])
    member_settings: dict[str, dict] = field(
        default_factory=lambda: {"logistic": {"c": 0.01, "surface_features": False}}
    )
    kind = "ensemble"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.members or "ensemble" in self.members:
            raise RouterError("an ensemble needs member routers (and none of them an ensemble)")
        self._members = [make_router(k, **self.member_settings.get(k, {})) for k in self.members]

    @property
    def use_embedding(self) -> bool:  # read by the gateway
        return any(m.kind != "random" and getattr(m, "use_embedding", True) for m in self._members)

    def _share_embedder(self) -> None:
        if self.embedder is None and self.use_embedding:
            self.embedder = Embedder()
        for m in self._members:
            m.embedder = self.embedder  # one model in memory, one cache

    def _fit(self, rows, y):
        self._share_embedder()
        for i, m in enumerate(self._members):
            m.fit(rows)
            self.arrays.update({f"m{i}.{k}": v for k, v in m.arrays.items()})
            self.member_settings[m.kind] = m.settings()  # e.g. a cascade's cheap model, chosen in fit

    def _restore(self) -> None:
        self._members = [make_router(k, **self.member_settings.get(k, {})) for k in self.members]
        for i, m in enumerate(self._members):
            m.models = list(self.models)
            p = f"m{i}."
            m.arrays = {k[len(p) :]: v for k, v in self.arrays.items() if k.startswith(p)}
            m._restore()

    def _score(self, rows):
        self._share_embedder()
        return np.mean([m.score(rows) for m in self._members], axis=0)


ROUTERS: dict[str, type[Router]] = {
    cls.kind: cls
    for cls in (
        RandomRouter,
        KNNRouter,
        LogisticRouter,
        MLPRouter,
        MFRouter,
        CascadeRouter,
        GBMRouter,
        EnsembleRouter,
    )
}


def make_router(kind: str, **settings) -> Router:
    if kind not in ROUTERS:
        raise RouterError(f"unknown router {kind!r}; choose one of {', '.join(ROUTERS)}")
    try:
        return ROUTERS[kind](**settings)
    except TypeError as exc:
        raise RouterError(f"bad settings for router {kind!r}: {exc}") from None


def load_router(path: str | Path) -> Router:
    path = Path(path)
    meta_path = path / "router.json"
    if not meta_path.is_file():
        raise RouterError(f"not a saved router (no router.json): {path}")
    try:
        meta = json.loads(meta_path.read_text())
        router = make_router(meta["kind"], **meta.get("settings", {}))
        router.models = list(meta["models"])
        router.mean_quality = {str(m): float(q) for m, q in meta.get("mean_quality", {}).items()}
        with np.load(path / "arrays.npz") as z:
            router.arrays = {k: z[k] for k in z.files}
        router._restore()
    except (json.JSONDecodeError, KeyError, OSError, ValueError) as exc:
        raise RouterError(f"cannot read router at {path}: {exc}") from None
    return router
