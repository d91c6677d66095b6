"""ExtractionPolicy: harden what a model returns, watch each client's query stream, and
respond in stages (alert → throttle → quarantine) when it looks like extraction.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from controlplane.api import jsonpath
from controlplane.api.base import (
    DnsLabel,
    DnsSubdomain,
    FieldError,
    Model,
    PolicyBase,
    at_least_one,
    exactly_one,
)
from controlplane.api.common import (
    ClientKey,
    Duration,
    HeaderName,
    PositiveInt,
    TargetRef,
    Window,
    parse_duration,
)

_JSON_PATH = re.compile(r"\$\S*")


def _json_path(value: str) -> str:
    if not _JSON_PATH.fullmatch(value):
        raise ValueError("must be a JSONPath starting with '$' (e.g. $.instances[*])")
    try:
        jsonpath.JsonPath.parse(value)
    except jsonpath.JsonPathError as err:
        raise ValueError(f"must be a JSONPath like $.instances[*]: {err}") from None
    return value


JsonPath = Annotated[
    str, AfterValidator(_json_path), Field(json_schema_extra={"pattern": r"^\$\S*$"})
]


# Body shapes. json: the paths select the vectors themselves (rows as arrays, or as objects
# with featureNames); kserveV2: they select KServe v2 / Open Inference Protocol tensors
# ({"name", "shape", "datatype", "data"}), whose rows come from shape[0] (data flat or nested).
BodyFormat = Literal["json", "kserveV2"]

# Envoy's default per-connection buffer limit: the filter buffers a request to check it, and
# Envoy itself answers 413 past this, so a larger cap would be a promise not kept.
MAX_REQUEST_BYTES = 1024 * 1024
# The default cap is what the query feed ships whole (QueryFeedIR.max_body_bytes): every
# request a model answers then reaches the monitor and is judged, padded or not.
DEFAULT_REQUEST_BYTES = 64 * 1024
DEFAULT_MAX_DEPTH = 64  # JSON nesting the sidecar lets through (the hardening scan's own bound)


class RequestFields(Model):
    features: JsonPath  # the query vectors (json) or input tensors (kserveV2) in a request
    format: BodyFormat = "json"
    # Rows sent as objects ({"age": 41, ...}): the columns, in the model's order.
    feature_names: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, min_length=1
    )
    # Refused by the sidecar with 413 and a JSON reason before the model sees them.
    max_bytes: int = Field(default=DEFAULT_REQUEST_BYTES, ge=1024, le=MAX_REQUEST_BYTES)
    max_instances: PositiveInt | None = None  # rows per request (at features); None: any
    max_depth: int = Field(default=DEFAULT_MAX_DEPTH, ge=4, le=256)  # deeper: 400

    @field_validator("feature_names")
    @classmethod
    def _unique_names(cls, names: list[str] | None) -> list[str] | None:
        for i, name in enumerate(names or []):
            if name in (names or [])[:i]:
                raise FieldError((i,), f"duplicate feature name {name!r}")
        return names

    @model_validator(mode="after")
    def _names_need_json(self) -> RequestFields:
        if self.feature_names is not None and self.format != "json":
            raise FieldError(
                ("featureNames",), "applies to format json (kserveV2 tensors carry columns)"
            )
        return self


class ResponseFields(Model):
    """Where the model's answer is. ``scores``: per-class scores (json) or the output tensor
    (kserveV2), what the sidecar hardens and the monitor takes each row's class from (their
    argmax). ``label``: the predicted label (a class number or name, json or kserveV2), read
    by the monitor where there are no readable scores: a model that answers labels only
    sets ``label`` alone. At least one of them."""

    scores: JsonPath | None = None
    label: JsonPath | None = None
    format: BodyFormat = "json"

    @model_validator(mode="after")
    def _scores_or_label(self) -> ResponseFields:
        at_least_one({"scores": self.scores, "label": self.label})
        return self


class Hardening(Model):
    """How the sidecar perturbs a response before the client sees it."""

    top_k: int | None = Field(default=None, ge=1)  # keep the k highest scores
    round_digits: int | None = Field(default=None, ge=0, le=10)
    label_only: bool = False  # drop scores, return only the label
    noise: float | None = Field(default=None, ge=0, le=0.5)  # bounded, order-preserving

    @model_validator(mode="after")
    def _label_only_alone(self) -> Hardening:
        if self.label_only:
            with_scores = [
                name
                for name, value in (
                    ("topK", self.top_k),
                    ("roundDigits", self.round_digits),
                    ("noise", self.noise),
                )
                if value is not None
            ]
            if with_scores:
                raise FieldError(
                    ("labelOnly",),
                    f"returns no scores, so {', '.join(with_scores)} cannot apply; remove "
                    f"{'it' if len(with_scores) == 1 else 'them'} or set labelOnly: false",
                )
        return self


class OutputHardening(Hardening):
    """Default hardening, plus optional per-tier replacements.

    A client's tier is the value of ``tierHeader`` (set by a trusted hop, e.g. the API-key
    filter from the key's metadata). A tier's settings replace the defaults whole; clients
    without a known tier get the defaults.
    """

    tier_header: HeaderName | None = None
    tiers: dict[DnsLabel, Hardening] = {}

    @model_validator(mode="after")
    def _tiers_need_header(self) -> OutputHardening:
        if self.tiers and self.tier_header is None:
            raise FieldError(("tierHeader",), "required when tiers are set")
        if self.tier_header is not None and not self.tiers:
            raise FieldError(("tiers",), "required when tierHeader is set")
        return self


Detector = Literal["prada", "nearDuplicate", "coverage", "outOfDistribution"]
ALL_DETECTORS: tuple[Detector, ...] = ("prada", "nearDuplicate", "coverage", "outOfDistribution")
# Detectors that compare a client's queries with the model's own data, not with each other.
NEEDS_REFERENCE: tuple[Detector, ...] = ("coverage", "outOfDistribution")
# Without reference data: the detectors that compare a client's queries with each other.
WITHOUT_REFERENCE: tuple[Detector, ...] = ("prada", "nearDuplicate")


class ConfigMapKey(Model):
    name: DnsSubdomain
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]


class ReferenceSource(Model):
    """Rows like the model's own traffic, for calibration and the reference detectors.

    ``file``: CSV (header row optional), JSON Lines of arrays, or ``.npy``; a relative path
    is relative to the policy file. ``configMap`` (cluster mode): a key of a ConfigMap in
    the policy's namespace (``binaryData`` for ``.npy``). ``labelColumn``: a column holding
    the model's own answer on that row (class, or score), which is then not a feature.
    """

    file: Annotated[str, Field(min_length=1)] | None = None
    config_map: ConfigMapKey | None = None
    label_column: str | int | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ReferenceSource:
        exactly_one({"file": self.file, "configMap": self.config_map})
        return self


class Detection(Model):
    # Default: all four with reference data, prada and nearDuplicate without.
    detectors: list[Detector] | None = Field(default=None, min_length=1)
    # Trades detection speed for false positives; thresholds are calibrated on benign traffic.
    sensitivity: Literal["low", "medium", "high"] = "medium"
    reference: ReferenceSource | None = None

    @field_validator("detectors")
    @classmethod
    def _unique(cls, detectors: list[Detector] | None) -> list[Detector] | None:
        for i, detector in enumerate(detectors or ()):
            if detector in (detectors or [])[:i]:
                raise FieldError((i,), f"duplicate detector {detector}")
        return detectors

    @model_validator(mode="after")
    def _reference_for_detectors(self) -> Detection:
        if self.reference is None:
            for i, detector in enumerate(self.detectors or ()):
                if detector in NEEDS_REFERENCE:
                    raise FieldError(
                        ("detectors", i),
                        f"{detector} compares queries with the model's own data: set "
                        "spec.detection.reference (file or configMap) or remove it",
                    )
        return self

    @property
    def enabled(self) -> tuple[Detector, ...]:
        if self.detectors is not None:
            return tuple(self.detectors)
        return ALL_DETECTORS if self.reference is not None else WITHOUT_REFERENCE


class Throttle(Model):
    requests: PositiveInt
    per: Window


class OnSuspicion(Model):
    throttle: Throttle


class Quarantine(Model):
    duration: Duration  # 30s, 15m, 24h, 7d, 1h30m

    @property
    def seconds(self) -> int:
        return parse_duration(self.duration)


class OnDetection(Model):
    quarantine: Quarantine


class RiskStep(Model):
    """One step of ``onRisk``: once a client's estimated extraction fidelity reaches
    ``fidelity``, it is answered with the output tier ``harden`` names, or throttled."""

    # In (0, 1]: the bound is checked below (CRD schemas take exclusive bounds on integers only).
    fidelity: float = Field(ge=0, le=1)
    harden: DnsLabel | None = None  # a name in spec.output.tiers
    throttle: Throttle | None = None

    @field_validator("fidelity")
    @classmethod
    def _above_zero(cls, value: float) -> float:
        if value == 0:
            raise ValueError("must be greater than 0: every client starts at fidelity 0")
        return value

    @model_validator(mode="after")
    def _one_action(self) -> RiskStep:
        if (self.harden is None) == (self.throttle is None):
            raise FieldError((), "needs exactly one of harden or throttle")
        return self


def _ascending(steps: list[RiskStep]) -> list[RiskStep]:
    for i in range(1, len(steps)):
        if steps[i].fidelity <= steps[i - 1].fidelity:
            raise FieldError(
                (i, "fidelity"),
                f"must be above the previous step's {steps[i - 1].fidelity:g}: steps are "
                "listed from the lowest fidelity up",
            )
    return steps


RiskSteps = Annotated[list[RiskStep], Field(min_length=1), AfterValidator(_ascending)]


class OnRisk(Model):
    """Staged, graceful answers to what a client could have learned (its estimated
    extraction fidelity, ``controlplane.extraction.risk``): a knowledge budget, not a
    detector verdict, so it hardens and throttles but never quarantines.

    ``tiers`` replaces ``steps`` whole for clients of an output tier (the sidecar's
    ``tierHeader``): a paying tier may learn more before its answers are hardened. The
    sidecar resolves the tier per request, so tier lists hold ``harden`` steps only; the
    control plane does not see a client's tier, so ``throttle`` steps apply to every client.
    """

    steps: RiskSteps
    tiers: dict[DnsLabel, RiskSteps] = {}
    duration: Duration = "24h"  # how long a reached step holds after the client's last estimate

    @field_validator("tiers")
    @classmethod
    def _tiers_harden_only(cls, tiers: dict[str, list[RiskStep]]) -> dict[str, list[RiskStep]]:
        for name, steps in tiers.items():
            for i, step in enumerate(steps):
                if step.throttle is not None:
                    raise FieldError(
                        (name, i, "throttle"),
                        "tier lists take harden steps only (the sidecar knows a client's "
                        "tier, the control plane does not); put throttle steps in steps",
                    )
        return tiers

    @property
    def seconds(self) -> int:
        return parse_duration(self.duration)


class Actions(Model):
    """Staged responses to detector verdicts. Every verdict is also an alert (OTel event)."""

    on_suspicion: OnSuspicion | None = None
    on_detection: OnDetection | None = None
    on_risk: OnRisk | None = None


class ExtractionPolicySpec(Model):
    target_ref: TargetRef
    client_key: ClientKey
    request: RequestFields
    response: ResponseFields
    output: OutputHardening | None = None
    # An answer the sidecar cannot harden because it is too large: Deny (502 with a JSON
    # reason) or Pass. Deny by default: otherwise a client that makes answers large (many
    # instances) gets them unhardened. Malformed or unmatched answers always pass (counted).
    on_unhardenable: Literal["Deny", "Pass"] = "Deny"
    detection: Detection | None = None
    actions: Actions | None = None

    @model_validator(mode="after")
    def _output_needs_scores(self) -> ExtractionPolicySpec:
        if self.output is not None and self.response.scores is None:
            raise FieldError(
                ("output",),
                "hardens the model's scores: set spec.response.scores, or remove it (a model "
                "that answers labels only has nothing to harden)",
            )
        return self

    @model_validator(mode="after")
    def _actions_need_detection(self) -> ExtractionPolicySpec:
        if self.actions is not None and self.detection is None:
            raise FieldError(("actions",), "requires detection: actions follow its verdicts")
        on_risk = self.actions.on_risk if self.actions is not None else None
        if on_risk is not None and self.detection is not None and self.detection.reference is None:
            # The estimate scores each client's surrogate on held-out reference rows.
            raise FieldError(
                ("actions", "onRisk"),
                "the extraction-risk estimate scores what a client learned on the model's own "
                "data: set spec.detection.reference (file or configMap, with labelColumn)",
            )
        if on_risk is not None:
            self._check_risk_tiers(on_risk)
        return self

    def _check_risk_tiers(self, on_risk: OnRisk) -> None:
        """Every tier onRisk names must be an output tier the sidecar can apply."""
        known = sorted(self.output.tiers) if self.output is not None else []
        where = ("actions", "onRisk")

        def missing(name: str) -> str:
            have = f"spec.output.tiers has {', '.join(known)}" if known else "no spec.output.tiers"
            return f"no output tier {name!r} ({have})"

        for i, step in enumerate(on_risk.steps):
            if step.harden is not None and step.harden not in known:
                raise FieldError((*where, "steps", i, "harden"), missing(step.harden))
        for tier, steps in on_risk.tiers.items():
            if tier not in known:
                raise FieldError((*where, "tiers", tier), missing(tier))
            for i, step in enumerate(steps):
                if step.harden is not None and step.harden not in known:
                    raise FieldError((*where, "tiers", tier, i, "harden"), missing(step.harden))


class ExtractionPolicy(PolicyBase):
    KIND: ClassVar[str] = "ExtractionPolicy"

    kind: Literal["ExtractionPolicy"] = "ExtractionPolicy"
    spec: ExtractionPolicySpec


def resolve_reference(
    policy: ExtractionPolicy, source: str
) -> tuple[ExtractionPolicy, list[tuple[str, str]]]:
    """The policy with its reference ``file`` made absolute (relative to the policy file
    ``source``), and every problem of that file as ``(field path, message)``.

    The file is read and checked here, when the policy is loaded, so a bad reference is
    refused like any other bad field and the last good policy keeps serving.
    """
    detection = policy.spec.detection
    reference = detection.reference if detection else None
    if detection is None or reference is None or reference.file is None:
        return policy, []
    from pathlib import Path

    from controlplane.api.reference import ReferenceError, load_file

    path = Path(reference.file).expanduser()
    if not path.is_absolute():
        base = Path(source).parent if Path(source).is_file() else Path.cwd()
        path = (base / path).resolve()
    prefix = "spec.detection.reference"
    try:
        load_file(path, reference.label_column)
    except ReferenceError as err:
        loc = ".".join(str(part) for part in err.loc)
        return policy, [(f"{prefix}.{loc}", str(err))]
    resolved = reference.model_copy(update={"file": str(path)})
    spec = policy.spec.model_copy(
        update={"detection": detection.model_copy(update={"reference": resolved})}
    )
    return policy.model_copy(update={"spec": spec}), []
