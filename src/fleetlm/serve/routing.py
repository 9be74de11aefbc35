"""The router as a virtual model: fleet.yaml's `router:` section turned into per-request decisions.

A request for `model: "auto"` (or whatever router.name says) is routed here before generation: the prompt is
embedded (MiniLM, cached in memory by content hash), the fitted router saved by `fleet route fit` predicts
each candidate's quality, and a rule picks the model:

- calibrated: DIR/calibration.json from `fleet route calibrate` holds a threshold on
  score[strong] - score[weak] that keeps the configured quality floor with a stated confidence; used when
  its floor is the configured one and both of its models are candidates;
- budget (router.budget_usd_per_1k): maximise predicted quality - lambda x cost, where lambda follows the
  spend (it rises while requests cost more than the budget and falls while they cost less);
- floor (the default): the cheapest model whose predicted quality is at least floor x the best prediction;
  with router.floor_scope `traffic`, the cheapest within (1 - floor) x the strongest model's mean quality of
  the best prediction, so that the floor holds over the traffic (in expectation) rather than per request.

Kinds `cheapest` and `strongest` need no fitted router. A fitted `cascade` router routes after generation:
the cheap model answers first, the router's cheap checks score that answer, and the gateway escalates when
the rule above picks another model (`review`).

A `cascade` with `checks` (and no path) needs no fitted router either: `models` is a ladder, cheapest first
(default: every model by price). The first model answers, the checks of route/checks.py that apply to the
request run on its answer (`check_answer`), and on a failure the next model answers, up to the last, whose
answer is kept unchecked. The gateway climbs the ladder (`ladder` in the decision's extra). A recorded
model (replay) on the ladder is left out for a prompt it holds no recording of.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fleetlm.config import FleetConfig, RouterSpec
from fleetlm.errors import ConfigError, FleetError
from fleetlm.route.checks import (
    CheckResult,
    applicable_checks,
    code_check,
    json_check,
    math_check,
    response_schema,
    tool_call_check,
)
from fleetlm.route.choose import choose_floor, choose_margin, choose_tradeoff
from fleetlm.route.data import RouteRow, prompt_id
from fleetlm.route.routers import Router as FittedRouter
from fleetlm.route.routers import RouterError, load_router
from fleetlm.serve.backends import Generation, RouteDecision
from fleetlm.serve.errors import BadRequest, ServiceUnavailable
from fleetlm.serve.protocol import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from fleetlm.route.calibrate import Tradeoff

log = logging.getLogger(__name__)

UNFITTED_KINDS = ("cheapest", "strongest")
DEFAULT_OUTPUT_TOKENS = 256  # expected answer length when the request sets no limit (for cost estimates)
CHARS_PER_TOKEN = 4.0
BUDGET_STEP = 0.02  # how fast lambda follows the spend; ~50 requests to react to a change in traffic


def prompt_text(request: Any) -> str:
    """What the router reads: the last user message of a chat, the (first) prompt of a completion."""
    if isinstance(request, ChatCompletionRequest):
        users = [m for m in request.messages if m.role == "user"]
        return (users[-1] if users else request.messages[-1]).text()
    if isinstance(request, CompletionRequest):
        first = request.prompts()[0]
        if not isinstance(first, str):  # ids of which model's vocabulary? the router reads text
            raise BadRequest("the router reads text: send the prompt as a string, or name a model",
                             param="prompt")
        return first
    raise BadRequest("the router serves chat and completions only; name an embedding model", param="model")


@dataclass
class Calibrated:
    """A threshold from `fleet route calibrate`: strong when score[strong] - score[weak] >= threshold."""

    strong: int  # candidate indices
    weak: int
    threshold: float
    floor: float
    confidence: float


class FleetRouter:
    """The gateway's router: `route` before generation, `review` of a cheap answer for a cascade."""

    def __init__(
        self,
        spec: RouterSpec,
        config: FleetConfig,
        candidates: list[str],
        fitted: FittedRouter | None = None,
        fitted_names: list[str] | None = None,
        calibration: Calibrated | None = None,
        tradeoff: Tradeoff | None = None,
    ) -> None:
        self.name = spec.name
        self.spec, self.config = spec, config
        self.candidates = candidates  # fleet model names, in the fitted router's order when there is one
        self.fitted = fitted
        self.fitted_names = fitted_names or []  # the fitted router's name for each candidate
        self.calibration = calibration
        self.kind = fitted.kind if fitted is not None else spec.kind
        self.cascade = fitted is not None and fitted.needs_responses
        self.cheap: str | None = None
        if self.cascade:
            assert fitted is not None
            self.cheap = candidates[self.fitted_names.index(getattr(fitted, "cheap", ""))]
        # a cascade with checks: the ladder of models, cheapest first (None for every other router)
        self.ladder: list[str] | None = candidates if spec.checks and fitted is None else None
        self._lambda = 0.0
        self._lock = threading.Lock()
        self.tradeoff = tradeoff if spec.floor_scope == "traffic" else None
        # prices relative to the priciest candidate: the scale the tradeoff's weight was calibrated on
        out = np.array([config.models[m].price.output for m in candidates], dtype=np.float64)
        self.relative_prices = out / max(float(out.max()), 1e-12)
        self.margin = self._traffic_margin()
        self.step_models = {k: self._fleet_model(m, f"router.step_models.{k}")
                            for k, m in (spec.step_models or {}).items()}

    def _fleet_model(self, name: str, where: str) -> str:
        model = self.config.resolve(name)
        if model is None:
            raise ConfigError(f"{where}: {name!r} is not a model of the fleet")
        return model

    def _traffic_margin(self) -> float | None:
        """floor_scope traffic: the quality a pick may give up, (1 - floor) x the strongest's mean quality."""
        if self.spec.floor_scope != "traffic" or self.fitted is None or self.tradeoff is not None:
            return None
        strongest = self.config.strongest_model()
        if strongest not in self.candidates:
            strongest = max(self.candidates, key=lambda m: self.config.models[m].price.output)
        name = self.fitted_names[self.candidates.index(strongest)]
        quality = getattr(self.fitted, "mean_quality", {}).get(name)
        if quality is None:
            raise ConfigError(f"router {self.name!r}: floor_scope traffic needs the models' mean quality, "
                              "which this fitted router does not hold (refit it with `fleet route fit`)")
        return (1.0 - self.spec.quality_floor) * quality

    # ------------------------------------------------------------ costs

    def estimated_costs(self, request: Any, text: str) -> np.ndarray:
        """Dollars this request would cost on each candidate (chars / 4 tokens in, its limit or 256 out)."""
        tokens_in = max(1, math.ceil(len(text) / CHARS_PER_TOKEN))
        limit = request.token_limit() if hasattr(request, "token_limit") else None
        tokens_out = min(limit, DEFAULT_OUTPUT_TOKENS) if limit else DEFAULT_OUTPUT_TOKENS
        n = getattr(request, "n", 1) or 1
        return np.array(
            [self.config.models[m].price.cost(tokens_in, tokens_out * n) for m in self.candidates],
            dtype=np.float64,
        )

    # ------------------------------------------------------------ decisions

    def _decide(self, pred: np.ndarray, costs: np.ndarray, prefix: str) -> RouteDecision:
        """Pick a candidate from predicted qualities [len(candidates)] by the configured rule."""
        cal, spec = self.calibration, self.spec
        scores = {m: round(float(q), 4) for m, q in zip(self.candidates, pred, strict=True)}
        if cal is not None:
            signal = float(pred[cal.strong] - pred[cal.weak])
            j = cal.strong if signal >= cal.threshold else cal.weak
            rule = (
                f"calibrated floor {cal.floor:g} at {cal.confidence:.0%}: signal {signal:+.3f} "
                f"{'>=' if j == cal.strong else '<'} {cal.threshold:+.3f}"
            )
        elif spec.budget_usd_per_1k is not None:
            per_request = spec.budget_usd_per_1k / 1000.0
            with self._lock:
                lam = self._lambda
                if per_request <= 0:
                    j = int(np.argmin(costs))
                else:
                    rel = costs / per_request  # cost in units of the budget per request
                    order = np.argsort(costs, kind="stable")  # ties go to the cheaper model
                    j = int(order[np.argmax((pred - lam * rel)[order])])
                    # A Lagrangian step on the spend: lambda rises while requests cost more than the budget
                    # and falls while they cost less, so the average spend settles at the budget.
                    self._lambda = max(0.0, lam + BUDGET_STEP * (min(float(rel[j]), 10.0) - 1.0))
            rule = f"budget ${spec.budget_usd_per_1k:g}/1k: lambda {lam:.3f}"
        elif self.tradeoff is not None:
            t = self.tradeoff
            j = int(choose_tradeoff(pred[None, :], self.relative_prices, t.lam)[0])
            rule = (f"traffic floor {spec.quality_floor:g}: max q - {t.lam:.3f} x relative price "
                    f"(calibrated: {t.quality:.3f} vs strongest {t.strongest_quality:.3f})")
        elif self.margin is not None:
            j = int(choose_margin(pred[None, :], costs, self.margin)[0])
            best = int(np.argmax(pred))
            rule = (f"traffic floor {spec.quality_floor:g}: within {self.margin:.3f} of best "
                    f"{self.candidates[best]} q={pred[best]:.3f}")
        else:
            j = int(choose_floor(pred[None, :], costs, spec.quality_floor)[0])
            best = int(np.argmax(pred))
            rule = f"floor {spec.quality_floor:g} of best {self.candidates[best]} q={pred[best]:.3f}"
        model = self.candidates[j]
        reason = f"{prefix}{self.kind}: {model} q={pred[j]:.3f}; {rule}"
        return RouteDecision(model, reason, float(pred[j]), {"scores": scores, "rule": rule})

    def _score(self, rows: list[RouteRow]) -> np.ndarray:
        assert self.fitted is not None
        try:
            pred = self.fitted.score(rows)
        except FleetError as exc:
            raise ServiceUnavailable(f"router {self.name!r} failed: {exc}") from None
        # The fitted router's columns, reordered to the candidates (dropping models the fleet lacks).
        cols = [self.fitted.models.index(n) for n in self.fitted_names]
        return np.asarray(pred, dtype=np.float64)[:, cols]

    def route(self, request: ChatCompletionRequest | CompletionRequest) -> RouteDecision:
        step = getattr(request, "fleet_step", None)  # an agent's step kind (fleetlm/agent sends it)
        if step and step in self.step_models:
            model = self.step_models[step]
            return RouteDecision(model, f"{step} step: {model}")
        text = prompt_text(request)
        costs = self.estimated_costs(request, text)
        if self.kind == "cheapest":
            j = int(np.argmin(costs))
            return RouteDecision(self.candidates[j], f"cheapest: {self.candidates[j]}")
        if self.kind == "strongest":
            strongest = self.config.strongest_model()
            model = strongest if strongest in self.candidates else self.candidates[int(np.argmax(costs))]
            return RouteDecision(model, f"strongest: {model}")
        if self.cascade:
            assert self.cheap is not None
            return RouteDecision(self.cheap, f"cascade: {self.cheap} answers first", None, {"cascade": True})
        if self.ladder is not None:
            return self._climb_plan(request, text)
        pred = self._score([RouteRow(id=prompt_id(text), prompt=text)])[0]
        return self._decide(pred, costs, "")

    def review(self, request: ChatCompletionRequest | CompletionRequest, answers: list[str]) -> RouteDecision:
        """Cascade: score the cheap model's answers (the worst of n decides) and keep them or escalate."""
        assert self.fitted is not None and self.cheap is not None
        text = prompt_text(request)
        cheap_name = self.fitted_names[self.candidates.index(self.cheap)]
        rows = [
            RouteRow(id=prompt_id(text), prompt=text, responses={cheap_name: a}) for a in (answers or [""])
        ]
        pred = self._score(rows)
        worst = pred[int(np.argmin(pred[:, self.candidates.index(self.cheap)]))]
        decision = self._decide(worst, self.estimated_costs(request, text), "cascade ")
        if decision.model == self.cheap:
            decision.reason = f"kept {decision.reason}"
        else:
            decision.reason = f"escalated from {self.cheap}: {decision.reason}"
        return decision


    # ------------------------------------------------------------ cascade with checks

    def _request_parts(self, request: Any) -> tuple[dict | None, list[dict] | None]:
        fmt = getattr(request, "response_format", None)
        tools = getattr(request, "tools", None)
        return (fmt.model_dump(exclude_none=True) if fmt is not None else None,
                [t.model_dump(exclude_none=True) for t in tools] if tools else None)

    def checks_for(self, request: Any, text: str | None = None) -> list[str]:
        """The configured checks that apply to this request (route.checks.applicable_checks)."""
        fmt, tools = self._request_parts(request)
        return applicable_checks(text if text is not None else prompt_text(request), response_format=fmt,
                                 tools=tools, enabled=self.spec.checks or [])

    def _answerable(self, model: str, text: str) -> bool:
        """False for a recorded model (replay) that holds no recording of this prompt: it could only 404."""
        spec = self.config.models[model]
        if spec.kind != "replay":
            return True
        from fleetlm.serve.replay import load_recordings

        recordings = load_recordings(str(Path(spec.replay or "").resolve()), spec.replay_model or "")
        return recordings.lookup(text, spec.replay_match) is not None

    def _climb_plan(self, request: Any, text: str) -> RouteDecision:
        assert self.ladder is not None
        checks = self.checks_for(request, text)
        # a recorded top rung (GPT-4 on GSM8K) is climbed to only for the prompts it has an answer for
        ladder = [m for m in self.ladder if self._answerable(m, text)] or self.ladder
        first, last = ladder[0], ladder[-1]
        if not checks or len(ladder) == 1:
            model = last if self.spec.unchecked == "escalate" and checks == [] else first
            why = "no configured check applies" if not checks else "a ladder of one"
            return RouteDecision(model, f"cascade: {why}: {model} answers")
        samples = self.spec.math_samples if checks == ["math"] and getattr(request, "n", 1) == 1 else 1
        extra = {"ladder": ladder, "checks": checks, "samples": samples}
        return RouteDecision(first, f"cascade[{','.join(checks)}]: {first} answers first", None, extra)

    def check_answer(self, request: Any, gen: Generation, checks: list[str], samples: bool = False
                     ) -> list[CheckResult]:
        """Run `checks` on an answer. Every choice must pass; with `samples`, choice 0 is the answer and the
        other choices are samples whose final numbers must agree with it (math)."""
        text = prompt_text(request)
        fmt, tools = self._request_parts(request)
        choices = gen.choices[:1] if samples else gen.choices
        results: list[CheckResult] = []
        for choice in choices:
            answer = choice.text or ""
            for name in checks:
                if name == "code":
                    results.append(code_check(text, answer, timeout_s=self.spec.check_timeout_s))
                elif name == "math":
                    others = [c.text or "" for c in gen.choices[1:]] if samples else None
                    results.append(math_check(answer, others))
                elif name == "json":
                    results.append(json_check(answer, response_schema(fmt)))
                elif name == "tool":
                    choice_of = getattr(request, "tool_choice", None)
                    required = choice_of == "required" or isinstance(choice_of, dict)
                    if choice.tool_calls or required:
                        results.append(tool_call_check(choice.tool_calls, tools or [], required=required))
                    else:  # the model answered in text where it could have: nothing for this check to judge
                        results.append(CheckResult("tool", True, "answered in text, no tool call to check"))
        return results


def _calibration(path: Path, spec: RouterSpec, fitted_names: list[str]) -> Calibrated | None:
    file = path / "calibration.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
        strong, weak = data["strong"], data["weak"]
        threshold, floor = float(data["threshold"]), float(data["floor"])
        confidence = float(data.get("confidence", 0.0))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{file}: not a calibration written by `fleet route calibrate` ({exc})") from None
    if not math.isclose(floor, spec.quality_floor):
        log.warning(
            "%s is calibrated for floor %g, the config asks for %g: using the uncalibrated floor rule",
            file,
            floor,
            spec.quality_floor,
        )
        return None
    if strong not in fitted_names or weak not in fitted_names:
        log.warning("%s: %s or %s is not a candidate of the router; calibration unused", file, strong, weak)
        return None
    return Calibrated(fitted_names.index(strong), fitted_names.index(weak), threshold, floor, confidence)


def build_router(config: FleetConfig, embedder: Any = None, missing_ok: bool = False) -> FleetRouter | None:
    """The router fleet.yaml describes, loaded and ready (None when there is no `router:` section).

    A fitted kind needs router.path (with missing_ok, a missing path gives None: the router's name then
    answers 503); its models are matched to the fleet by name or alias. `embedder` replaces the shared
    in-memory MiniLM.
    """
    spec = config.router
    if spec is None:
        return None
    pool = [config.resolve(m) for m in (spec.models or list(config.models))]
    candidates = list(dict.fromkeys(m for m in pool if m is not None))
    if spec.kind in UNFITTED_KINDS:
        return FleetRouter(spec, config, candidates)
    if spec.checks:
        if spec.models is None:  # the ladder climbs by price when the config does not order it
            candidates.sort(key=lambda m: (config.models[m].price.output, config.models[m].price.input))
        return FleetRouter(spec, config, candidates)
    if spec.path is None:
        if missing_ok:
            log.warning(
                "router %r: kind %s has no router.path; requests for it get 503", spec.name, spec.kind
            )
            return None
        raise ConfigError(
            f"router {spec.name!r}: kind {spec.kind} needs router.path (a directory from `fleet route fit`)"
        )
    path = Path(spec.path)
    try:
        fitted = load_router(path)
    except RouterError as exc:
        raise ConfigError(f"router {spec.name!r}: {exc}") from None
    if fitted.kind != spec.kind:
        log.warning("router.kind is %s but %s holds a %s router: using it", spec.kind, path, fitted.kind)
    fleet_of = {n: config.resolve(n) for n in fitted.models}
    names = [n for n in fitted.models if fleet_of[n] in candidates]
    if not names:
        raise ConfigError(
            f"router {spec.name!r}: the fitted router knows {fitted.models}, none of which is a candidate "
            f"({', '.join(candidates)})"
        )
    ignored = [m for m in candidates if m not in {fleet_of[n] for n in names}]
    if ignored:
        log.warning(
            "router %r cannot score %s (not in its training data): never routed to", spec.name, ignored
        )
    cheap = getattr(fitted, "cheap", None)
    if fitted.needs_responses and cheap not in names:
        raise ConfigError(f"router {spec.name!r}: the cascade's cheap model {cheap!r} is not in the fleet")
    if embedder is None:
        from fleetlm.serve.embeddings import shared_minilm

        embedder = shared_minilm()
        if fitted.kind != "random" and getattr(fitted, "use_embedding", True):
            embedder.load()  # now, not on the first request
    fitted.embedder = embedder
    routed = [fleet_of[n] for n in names]
    return FleetRouter(spec, config, routed, fitted, names, _calibration(path, spec, names),  # type: ignore[arg-type]
                       _tradeoff(path, spec))


def _tradeoff(path: Path, spec: RouterSpec) -> Tradeoff | None:
    """DIR/tradeoff.json (written by the fleet recipe): the price weight keeping the floor over traffic."""
    from fleetlm.route.calibrate import Tradeoff  # here: it imports scipy.stats (0.7 s), not at start-up

    file = path / "tradeoff.json"
    if not file.is_file():
        return None
    try:
        tradeoff = Tradeoff.from_dict(json.loads(file.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{file}: not a price-weight calibration ({exc})") from None
    if not math.isclose(tradeoff.floor, spec.quality_floor):
        log.warning("%s is calibrated for floor %g, the config asks for %g: not used", file, tradeoff.floor,
                    spec.quality_floor)
        return None
    return tradeoff
