"""The extraction monitor: per-client detector state, verdicts and their staged actions.

For each batch a sidecar ships, the monitor extracts the query vectors (the policy's
``request.features``) and each row's class, folds them into each client's bounded state,
and moves the client along its stages. A row's class is the argmax of the model's
unhardened scores (``response.scores``); where there are none, or they cannot be read, the
label the model answered (``response.label``: a class number, or a name the reference's
label column numbers; ``_Labels``), so a model that answers labels only is watched with its
classes too:

- a detector's statistic reaches its threshold → **suspicion**: an alert, and the policy's
  ``onSuspicion`` throttle;
- at least ``CONFIRM_MIN`` new distinct queries later, a second detector at its
  threshold, a statistic at twice its threshold, or the same evidence still there
  ``confirm`` queries on → **detection**: an alert, and the policy's ``onDetection``
  quarantine. A client that stops when throttled is not quarantined.

How the detectors' evidence combines (issue 13: a lockout of a benign user is the most
expensive mistake): the detectors say different things.

- ``nearDuplicate`` says a client probes around a few points. Explanation tools (LIME,
  SHAP, what-if analysis) do exactly that, so its evidence alone is an alert verdict, never
  a throttle or a quarantine; it still counts as a second detector once another fired.
- ``prada`` says the client's distances are not those of natural queries; calibrated with
  single-class and local-exploration users in the benign null, it throttles. With
  reference data it grounds a quarantine only at ``ESCALATE`` times its threshold.
- ``outOfDistribution`` and ``coverage`` say the queries are unlike the model's own data or
  spread over directions it never varies in: the evidence an extraction needs to go beyond
  what natural use reveals. With reference data, a quarantine requires one of them among
  the confirming findings (``DECISIVE``), and only when the effect is large too (the
  client's mean residual, or mean novelty, beyond the natural 99th percentile:
  ``_decisive``), not only significant; without
  reference data (or while the policy's profile is still calibrating), ``prada`` is the
  decisive detector, at its reference-free default.
- ``denseSteps`` (computed with ``nearDuplicate``) says the client's near-duplicate steps
  move many inputs at once, far more per query than any benign explorer the profile was
  calibrated on (they edit 1-4 inputs a step): a gradient probe such as Jacobian-based
  augmentation, whose points are synthetic from the second round on. It throttles, and it
  is decisive for a quarantine on its own (threshold: benign maximum, never below 4 inputs
  per query, times the margin), without the spread floor: that floor spares
  clients that explore around a few inputs, and a client stepping densely around a few
  seeds is exactly what it detects.

A client whose requests mostly reach the monitor as "unobserved" (the sidecar could not
ship them) is suspected too: a gap in observation is a signal. It is never quarantined on
that alone, since there is no evidence about its queries.

Client state is bounded (``max_clients``, least recently seen evicted first) and expires
after ``idle_ttl`` seconds without a query. It is also bounded per tenant
(``max_clients_per_tenant``): a tenant with many keys (each its own client under
``clientKey: {apiKey: {}}``) evicts its own least recently seen clients, never other
tenants'; evictions are counted per tenant. A client's tenant is ``tenant_of`` its key id
(the registered keys' metadata), or the client itself (a tenant, an address, a claim).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import orjson

from controlplane.api import ExtractionPolicy, Policy
from controlplane.api.common import WINDOW_SECONDS
from controlplane.api.jsonpath import JsonPath
from controlplane.extraction.calibrate import BATCH, Profile
from controlplane.extraction.detectors import ClientState, DetectorName, Finding, Thresholds
from controlplane.extraction.hardened import Hardened, HardenStore
from controlplane.extraction.risk import HeldOut, RiskPlan, RiskSample, held_out_of
from controlplane.extraction.verdicts import (
    ClientRef,
    CompiledThrottler,
    Enforcement,
    Evidence,
    KeySource,
    Throttler,
    Verdict,
    VerdictSink,
    VerdictStore,
    matches,
)
from controlplane.gen.modelguard.feed.v1 import feed_pb2

log = logging.getLogger(__name__)

DEFAULT_THROTTLE_SECONDS = 3600  # a throttle without a quarantine duration to follow
UNOBSERVED_MIN = 50  # unobserved requests before a gap counts as a signal
ESCALATE = 2.0  # a statistic this many times its threshold confirms a suspicion
EVALUATE_EVERY = BATCH  # queries between two looks at a client's statistics
CONFIRM_MIN = 8  # new distinct queries after a suspicion before it can be confirmed
# Evidence that alone is an alert, never an enforcement (see the module docstring).
ALERT_ONLY: frozenset[str] = frozenset(("nearDuplicate",))
# What a quarantine needs among its findings: with reference data, off-distribution
# evidence; without it, prada.
DECISIVE: frozenset[str] = frozenset(("outOfDistribution", "coverage"))
DECISIVE_WITHOUT_REFERENCE: frozenset[str] = frozenset(("prada",))
# With reference data, decisive at ESCALATE times its threshold only (``_decisive``).
DECISIVE_ESCALATED: frozenset[str] = frozenset(("prada",))
# Decisive whatever the client's spread (module docstring): dense near-duplicate steps.
DECISIVE_ANY_SPREAD: frozenset[str] = frozenset(("denseSteps",))
# A quarantine also needs the client's fresh queries spread over at least this fraction
# of the reference data's dispersion (total variance: i.i.d. natural queries have 1). A
# fixed floor, not fitted to any attack: a stream of perturbations of one input spans only
# the perturbed inputs' share of it; a stream of one class of natural records, measured
# on the digits, 0.3-0.8 (and it has no off-distribution evidence to begin with).
SPREAD_MIN = 0.5


@dataclass(frozen=True)
class WatchedPolicy:
    """What the monitor needs of one ExtractionPolicy."""

    key: str  # namespace/name
    key_source: KeySource
    key_header: str | None
    features: JsonPath
    scores: JsonPath | None  # None: the model answers labels only
    detectors: tuple[DetectorName, ...]
    sensitivity: str
    throttle: tuple[int, int] | None  # requests per seconds
    quarantine_seconds: int | None
    reference: Any = None  # spec.detection.reference (ReferenceSource), None without
    namespace: str = "default"
    request_format: str = "json"  # json | kserveV2: how features/scores select rows
    feature_names: tuple[str, ...] = ()  # rows sent as objects: their columns, in order
    response_format: str = "json"
    on_risk: RiskPlan | None = None
    label: JsonPath | None = None  # spec.response.label: each row's predicted label

    @classmethod
    def of(cls, policy: ExtractionPolicy) -> WatchedPolicy | None:
        spec = policy.spec
        if spec.detection is None:
            return None
        actions = spec.actions
        on_suspicion = actions.on_suspicion if actions else None
        on_detection = actions.on_detection if actions else None
        return cls(
            key=f"{policy.metadata.namespace}/{policy.metadata.name}",
            # Verified keys are the headers the sidecar sets (key id, tenant, JWT claim):
            # verdicts name that header and its value, never a secret.
            key_source=spec.client_key.read_as[0],
            key_header=spec.client_key.read_as[1] or None,
            features=JsonPath.parse(spec.request.features),
            scores=JsonPath.parse(spec.response.scores) if spec.response.scores else None,
            detectors=tuple(spec.detection.enabled),
            sensitivity=spec.detection.sensitivity,
            throttle=(
                on_suspicion.throttle.requests,
                WINDOW_SECONDS[on_suspicion.throttle.per],
            )
            if on_suspicion
            else None,
            quarantine_seconds=on_detection.quarantine.seconds if on_detection else None,
            reference=spec.detection.reference,
            namespace=policy.metadata.namespace,
            request_format=spec.request.format,
            feature_names=tuple(spec.request.feature_names or ()),
            response_format=spec.response.format,
            on_risk=RiskPlan.of(actions.on_risk) if actions and actions.on_risk else None,
            label=JsonPath.parse(spec.response.label) if spec.response.label else None,
        )


@dataclass
class Tracked:
    state: ClientState
    stage: Literal["watching", "suspected", "detected"] = "watching"
    alerted: bool = False  # an alert-only verdict (nearDuplicate alone) was emitted
    suspected_at: int = 0  # distinct queries when suspected
    evaluated: int = 0  # queries (observed or not) at the last evaluation
    last_seen: float = 0.0
    tenant: str = ""  # what its per-tenant bound counts it under
    risk: RiskSample | None = None  # what the client could have learned (risk.py)
    risk_tiers: tuple[tuple[str, str], ...] = ()  # onRisk harden table in force
    risk_throttle: float = 0.0  # the onRisk throttle step in force (its fidelity)
    risk_until: float = 0.0  # when what onRisk put in force runs out


@dataclass
class MonitorStats:
    batches: int = 0
    queries: int = 0
    unobserved: int = 0
    unobserved_by_reason: Counter[str] = field(default_factory=Counter)
    unparsable: Counter[str] = field(default_factory=Counter)  # reason → count
    unknown_policy: int = 0
    evicted: int = 0
    expired: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    long_keys: int = 0  # client states filed under a digest: keys over KEY_LIMIT bytes
    refused_batches: int = 0  # batches naming another node than their caller (feed service)
    evicted_by_tenant: Counter[str] = field(default_factory=Counter)

    def copy(self) -> MonitorStats:
        return dataclasses.replace(
            self,
            evicted_by_tenant=Counter(self.evicted_by_tenant),
            unobserved_by_reason=Counter(self.unobserved_by_reason),
            unparsable=Counter(self.unparsable),
            verdicts=Counter(self.verdicts),
        )


_NUMBER_TYPES = frozenset((int, float))
_JSON_ERRORS = (UnicodeDecodeError, ValueError, RecursionError)  # junk, or nested too deep
KEY_LIMIT = 256  # bytes of a client key kept as it is; longer ones are tracked by digest
UNOBSERVED_REASONS = frozenset(("buffer_full", "body_too_large", "call_failed", "incomplete"))


def _loads(body: bytes) -> Any:
    """A body's JSON, as ``json.loads`` reads it.

    orjson reads a query body in a fifth of the time. What it refuses and the standard
    library reads (NaN, a byte-order mark, UTF-16, lone surrogates, nesting past 1,024)
    is read by the standard library, so no body is judged differently; past 2**64 orjson
    makes integers floats, which is what they become in a query vector anyway.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def _is_numbers(value: Any) -> bool:
    """A non-empty flat list of JSON numbers (the values still to be checked finite)."""
    # numpy would read booleans and numeric strings as numbers: a client's junk must not.
    # json.loads makes only exact ints, floats, bools, strs, lists and dicts, so the set of
    # exact types says it all (bool is not int here), in C rather than per element.
    return type(value) is list and bool(value) and _NUMBER_TYPES.issuperset(map(type, value))


def _matrix(rows: list[list[Any]], dtype: type[np.floating[Any]]) -> tuple[Any, Any]:
    """Rows of one length as one matrix (one numpy call for a whole batch rather than a few
    per row), and which of them are finite in ``dtype``: an integer past float range, an
    infinity, or a value the float32 state cannot hold makes its row junk."""
    try:
        M = np.array(rows, dtype=np.float64)
    except OverflowError:  # an integer beyond float range somewhere: find it row by row
        M = np.empty((len(rows), len(rows[0])))
        for i, row in enumerate(rows):
            try:
                M[i] = row
            except OverflowError:
                M[i] = np.nan
    if dtype is not np.float64:
        with np.errstate(over="ignore"):
            M = M.astype(dtype)
    return M, np.isfinite(M).all(axis=1)


def _flat(data: Any) -> list[Any] | None:
    """A tensor's data, nested or flat, as one flat list (None if not lists and numbers)."""
    if type(data) is not list:
        return None
    if not any(type(x) is list for x in data):
        return data
    out: list[Any] = []
    stack = [iter(data)]
    while stack:  # no recursion: nesting is the client's to choose
        for x in stack[-1]:
            if type(x) is list:
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _tensor_rows(tensors: list[Any]) -> list[Any] | None:
    """KServe v2 / Open Inference Protocol tensors ({"name", "shape", "datatype", "data"})
    as rows: shape[0] rows each, of prod(shape[1:]) columns; several tensors (one per
    input) give their columns side by side, in order. None if they do not fit together."""
    columns: list[list[list[Any]]] = []
    n_rows = None
    for tensor in tensors:
        if type(tensor) is not dict:
            return None
        shape, data = tensor.get("shape"), _flat(tensor.get("data"))
        if (
            data is None
            or type(shape) is not list
            or not shape
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            return None
        width = 1
        for d in shape[1:]:
            width *= d
        # width 0 would let shape[0] (the client's number) size the rows, not the data
        if width == 0 or shape[0] * width != len(data) or n_rows not in (None, shape[0]):
            return None
        n_rows = shape[0]
        columns.append([data[i * width : (i + 1) * width] for i in range(n_rows)])
    if not columns:
        return None
    if len(columns) == 1:
        return columns[0]
    return [[x for part in parts for x in part] for parts in zip(*columns, strict=True)]


def _rows(found: list[Any], fmt: str) -> list[Any] | None:
    """The request's rows at ``request.features``, as the policy's format gives them."""
    return _tensor_rows(found) if fmt == "kserveV2" else found


def _columns(rows: list[Any], names: tuple[str, ...]) -> list[Any] | None:
    """Rows sent as objects ({"age": 41, ...}) as lists in ``featureNames`` order; a row
    without one of the names makes the query junk. Rows already lists stay as they are."""
    out = []
    for row in rows:
        if type(row) is dict:
            try:
                row = [row[name] for name in names]
            except KeyError:
                return None
        out.append(row)
    return out


def _scores(found: list[Any], fmt: str) -> list[Any]:
    """The answer's score rows: per-class vectors, or single scores (one number per row,
    regression or binary) as rows of one."""
    if fmt == "kserveV2":
        return _tensor_rows(found) or []
    if found and _NUMBER_TYPES.issuperset(map(type, found)):
        return [[x] for x in found]
    return found


def _answered_labels(found: list[Any], fmt: str, n_rows: int) -> list[Any] | None:
    """The answer's labels at ``response.label``, one per row, or None if they are not
    that. The path may select each row's label (``$.predictions[*].label``) or the array of
    them (``$.labels``); a label may be wrapped in a list of one (an (n, 1) output), and
    kserveV2 selects an output tensor of n rows of one value (INT64, or BYTES names)."""
    if fmt == "kserveV2":
        rows = _tensor_rows(found)
        if rows is None or any(len(row) != 1 for row in rows):
            return None
        found = [row[0] for row in rows]
    elif len(found) == 1 and type(found[0]) is list and len(found[0]) == n_rows:
        found = found[0]
    if len(found) != n_rows:
        return None
    return [x[0] if type(x) is list and len(x) == 1 else x for x in found]


# Class numbers a label can give (client state keeps them as int16, -1 for "unknown"):
# answered numbers below NEW_LABELS as they are; names the reference does not have get
# NEW_LABELS and up, in the order first answered. Labels come from the model, not the
# client, but the table of such names is bounded all the same: at most MAX_NEW_LABELS per
# policy, of at most MAX_LABEL_CHARS characters; a label past those is unreadable.
NEW_LABELS = 16384
MAX_NEW_LABELS = 256
MAX_LABEL_CHARS = 256


class _Labels:
    """One policy's answered labels as class numbers, numbered as the profile numbers them.

    With a reference whose label column holds names (``Profile.classes``), a name's class
    is its index there, as in the held-out answers the risk estimate compares with; a
    number answered is taken as that index (scikit-learn numbers a classifier's classes in
    the same sorted order). Otherwise a number (or its decimal text, or a boolean as 0/1)
    is its own class, as the reference's numeric label column holds them. A name the
    reference never had is a class of its own, not unreadable: the model answered it, and
    PRADA still tells it from the others (the risk estimate never agrees on it, rightly).
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self._index = {name: i for i, name in enumerate(names)}
        self._new: dict[str, int] = {}

    def class_of(self, label: Any) -> int | None:
        kind = type(label)
        if kind is int or kind is bool:
            number = int(label)
        elif kind is float:
            if not label.is_integer():
                return None
            number = int(label)
        elif kind is str:
            known = self._index.get(label)
            if known is not None:
                return known
            if not self.names and label.isascii() and label.isdigit() and len(label) <= 5:
                number = int(label)
            else:
                return self._new_class(label)
        else:
            return None
        return number if 0 <= number < NEW_LABELS else None

    def _new_class(self, name: str) -> int | None:
        number = self._new.get(name)
        if number is None:
            if len(self._new) >= MAX_NEW_LABELS or len(name) > MAX_LABEL_CHARS or not name:
                return None
            number = self._new[name] = NEW_LABELS + len(self._new)
        return number


def _finite(row: list[Any], dtype: type[np.floating[Any]]) -> bool:
    return bool(_matrix([row], dtype)[1][0])


def tracking_key(client_key: str) -> str:
    """What the monitor files a client's state under: the key itself up to ``KEY_LIMIT``
    bytes, else its first 200 characters and the SHA-256 of all of it. Distinct keys stay
    distinct and one key always lands in one state, so detection works for a client with a
    long key as for any other, in bounded memory; the result is longer than any key kept as
    it is, so no short key can take a long key's state."""
    if len(client_key) <= KEY_LIMIT // 4 or len(client_key.encode()) <= KEY_LIMIT:
        return client_key
    digest = hashlib.sha256(client_key.encode(errors="surrogatepass")).hexdigest()
    return f"{client_key[:200]}#sha256:{digest}"


@dataclass
class _ClientRows:
    """One client's part of a batch, as read."""

    key: str  # as the sidecar sent it: a verdict must name what the sidecar matches
    rows: list[int] = field(default_factory=list)  # into the batch's matrix
    labels: list[int] = field(default_factory=list)
    other_dimension: int = 0  # vectors of another dimension than the profile's


class ExtractionMonitor:
    def __init__(
        self,
        policies: Callable[[], Iterable[Policy]],
        verdicts: VerdictStore,
        sink: VerdictSink,
        *,
        profile: Callable[[WatchedPolicy], Profile | None],
        throttler: Throttler | None = None,
        hardened: HardenStore | None = None,
        held_out: Callable[[Profile], HeldOut | None] = held_out_of,
        max_clients: int = 2048,
        max_clients_per_tenant: int = 256,
        tenant_of: Callable[[str], str | None] | None = None,
        idle_ttl: float = 3600.0,
        confirm: int = 16,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._policies = policies
        self.verdicts = verdicts
        self.sink = sink
        self._profile = profile
        self.throttler: Throttler = throttler or CompiledThrottler(verdicts)
        self.hardened = hardened or HardenStore(clock)
        self._held_out = held_out
        self._held: dict[int, tuple[Profile, HeldOut | None]] = {}
        self.max_clients = max_clients
        self.max_clients_per_tenant = max_clients_per_tenant
        self.tenant_of = tenant_of  # set by the control plane from the registered keys
        self.idle_ttl = idle_ttl
        self.confirm = confirm
        self._clock = clock
        self._clients: OrderedDict[tuple[str, str], Tracked] = OrderedDict()
        # (policy, tenant) → its clients' filed keys, least recently seen first.
        self._tenants: dict[tuple[str, str], OrderedDict[str, None]] = {}
        self._lock = threading.Lock()
        self.stats = MonitorStats()
        self._watched: dict[str, WatchedPolicy] = {}
        self._watched_from: tuple[Policy, ...] = ()
        # Dimension of a reference-free policy: that of the first query vector it sees.
        self._dims: dict[str, int] = {}
        self._labels: dict[str, _Labels] = {}  # per watched policy with response.label

    # --- policies ---------------------------------------------------------------------------

    def watched(self, key: str) -> WatchedPolicy | None:
        """The ExtractionPolicy ``key`` (namespace/name) as the monitor watches it, if it does."""
        return self._policy(key)

    def _policy(self, key: str) -> WatchedPolicy | None:
        current = tuple(self._policies())
        if current != self._watched_from:
            watched = {}
            for policy in current:
                if isinstance(policy, ExtractionPolicy):
                    w = WatchedPolicy.of(policy)
                    if w is not None:
                        watched[w.key] = w
            self._watched, self._watched_from = watched, current
            self._labels = {k: v for k, v in self._labels.items() if k in watched}
        return self._watched.get(key)

    def warm_profiles(self) -> None:
        """Ask for every watched policy's profile, so calibration starts when a policy
        appears or changes rather than at its first query (and status shows it)."""
        with self._lock:
            self._policy("")
            watched = list(self._watched.values())
        for policy in watched:
            self._profile(policy)

    # --- the feed ---------------------------------------------------------------------------

    def report(self, batch: feed_pb2.FeedBatch) -> int:
        """Fold one batch from a sidecar into client state; returns the queries accepted."""
        with self._lock:
            return self._report(batch)

    def _report(self, batch: feed_pb2.FeedBatch) -> int:
        now = self._clock()
        self.stats.batches += 1
        self._expire(now)
        policy = self._policy(batch.policy)
        if policy is None:
            self.stats.unknown_policy += len(batch.queries)
            return 0
        profile = self._profile(policy)
        dim = None
        if profile is not None:
            dim = profile.dim if profile.dim is not None else self._dims.get(policy.key)
        classes = profile.classes if profile is not None else ()
        matrix, clients = self._read(policy, dim, batch.queries, classes)
        accepted = 0
        if profile is None:
            for client in clients.values():
                self.stats.unparsable["no_profile"] += client.other_dimension
        else:
            accepted = self._observe(policy, profile, matrix, clients, now)
        for gap in batch.unobserved:
            self.stats.unobserved += gap.count
            reason = gap.reason if gap.reason in UNOBSERVED_REASONS else "other"
            self.stats.unobserved_by_reason[reason] += gap.count
            if gap.client_key_raw:
                # Not UTF-8: no verdict could name it (the sidecar matches it as text).
                self.stats.unparsable["client_key"] += gap.count
                continue
            tracked = self._tracked(policy.key, gap.client_key, dim or 1, now)
            # Evidence in proportion to what those answers returned: their rows.
            tracked.state.unobserved += max(gap.count, gap.instances)
            self._judge(policy, profile, gap.client_key, tracked, now)
        self.stats.queries += accepted
        return accepted

    def _read(
        self,
        policy: WatchedPolicy,
        dim: int | None,
        queries: Iterable[feed_pb2.Query],
        names: tuple[str, ...] = (),
    ) -> tuple[npt.NDArray[np.float32], dict[str, _ClientRows]]:
        """The batch's query vectors of the profile's dimension as one float32 matrix, and
        each client's rows of it with their classes, clients in order of their first query.

        A row's class is the argmax of the model's scores; without readable scores, the
        label the model answered (``names``: the profile's class names, ``_Labels``); -1
        without either. Scores win where both are readable: they are what the model
        computed, a label may be a display name the reference does not know.

        A query is read whole or not at all: one vector that is not a flat row of finite
        numbers makes the whole query junk (``features``); unreadable scores and labels only
        cost the classes (``scores``, ``label``, ``response_json``). Numbers are checked and
        converted for the whole batch at once.
        """
        unparsable = self.stats.unparsable
        read: list[tuple[str, list[Any], list[Any] | str | None, Any]] = []
        for query in queries:
            if query.client_key_raw:
                # A key that is not UTF-8: this query is dropped and counted, the batch
                # goes on (a proto3 string key would have failed all of it).
                unparsable["client_key"] += 1
                continue
            try:
                request = _loads(query.request_body)
            except _JSON_ERRORS:
                unparsable["request_json"] += 1
                continue
            vectors = _rows(policy.features.find(request), policy.request_format)
            if vectors and policy.feature_names:
                vectors = _columns(vectors, policy.feature_names)
            if not vectors or not all(map(_is_numbers, vectors)):
                unparsable["features"] += 1
                continue
            # The scores' fate is counted once the vectors are known to be good.
            scores: list[Any] | str | None = None
            response = None
            if query.response_body:
                try:
                    response = _loads(query.response_body)
                except _JSON_ERRORS:
                    scores = "response_json"
                else:
                    if response is not None and policy.scores is not None:
                        found = _scores(policy.scores.find(response), policy.response_format)
                        ok = len(found) == len(vectors) and all(map(_is_numbers, found))
                        scores = found if ok else "scores"
            read.append((query.client_key, vectors, scores, response))
        # Feature rows: the profile's dimension into one matrix, others checked one by one.
        good = [True] * len(read)
        rows: list[list[Any]] = []
        owners: list[int] = []
        for q, (_, vectors, _, _) in enumerate(read):
            for v in vectors:
                if dim is None and self._profile(policy) is not None:
                    dim = self._dims[policy.key] = len(v)
                if len(v) == dim:
                    rows.append(v)
                    owners.append(q)
                elif not _finite(v, np.float32):
                    good[q] = False
        if rows:
            matrix, finite = _matrix(rows, np.float32)
            for bad in np.flatnonzero(~finite).tolist():
                good[owners[bad]] = False
        else:
            matrix = np.empty((0, dim or 0), dtype=np.float32)
        if not all(good):
            unparsable["features"] += good.count(False)
        # Classes: the scores of the good queries, by length, each length one matrix.
        classes: list[list[int] | None] = [None] * len(read)
        by_length: dict[int, tuple[list[list[Any]], list[tuple[int, int]]]] = {}
        for q, (_, _, scores, _) in enumerate(read):
            if not good[q]:
                continue
            if isinstance(scores, str):
                unparsable[scores] += 1
            elif scores is not None:
                classes[q] = [-1] * len(scores)
                for position, s in enumerate(scores):
                    group = by_length.setdefault(len(s), ([], []))
                    group[0].append(s)
                    group[1].append((q, position))
        unreadable: set[int] = set()
        for score_rows, places in by_length.values():
            S, finite = _matrix(score_rows, np.float64)
            # One score per row (regression, binary): its class is its side of 0.5, as the
            # sidecar keeps it; a value outside [0, 1] (regression) is one class, 0.
            top = (
                ((S[:, 0] >= 0.5) & (S[:, 0] <= 1)).astype(int).tolist()
                if S.shape[1] == 1
                else S.argmax(axis=1).tolist()
            )
            for i, (q, position) in enumerate(places):
                if finite[i]:
                    classes[q][position] = top[i]  # type: ignore[index]
                else:
                    unreadable.add(q)
        for q in unreadable:
            # Still worth watching: PRADA then treats all queries as one class.
            unparsable["scores"] += 1
            classes[q] = None
        if policy.label is not None:
            self._classes_from_labels(policy, names, read, good, classes)
        clients: dict[str, _ClientRows] = {}
        row = 0
        for q, (key, vectors, _, _) in enumerate(read):
            n_rows = sum(1 for v in vectors if len(v) == dim)
            if good[q]:
                client = clients.get(key)
                if client is None:
                    client = clients[key] = _ClientRows(key)
                labels = classes[q] or [-1] * len(vectors)
                for v, label in zip(vectors, labels, strict=True):
                    if len(v) == dim:
                        client.rows.append(row)
                        client.labels.append(label)
                        row += 1
                    else:
                        client.other_dimension += 1
            else:
                row += n_rows
        return matrix, clients

    def _classes_from_labels(
        self,
        policy: WatchedPolicy,
        names: tuple[str, ...],
        read: list[tuple[str, list[Any], list[Any] | str | None, Any]],
        good: list[bool],
        classes: list[list[int] | None],
    ) -> None:
        """Classes from the answered labels, for the good queries the scores left without."""
        assert policy.label is not None
        labels = self._labels.get(policy.key)
        if labels is None or labels.names != names:
            labels = self._labels[policy.key] = _Labels(names)
        for q, (_, vectors, _, response) in enumerate(read):
            if not good[q] or classes[q] is not None or response is None:
                continue
            found = _answered_labels(
                policy.label.find(response), policy.response_format, len(vectors)
            )
            numbers = [labels.class_of(x) for x in found or ()]
            if found is None or None in numbers:
                self.stats.unparsable["label"] += 1  # still watched, as without scores
                continue
            classes[q] = cast(list[int], numbers)

    def _observe(
        self,
        policy: WatchedPolicy,
        profile: Profile,
        matrix: npt.NDArray[np.float32],
        clients: dict[str, _ClientRows],
        now: float,
    ) -> int:
        """Fold each client's rows of one batch into its state.

        Each client's queries are first matched against its own history; the reference's
        values of the fresh ones (novelty: a distance matrix against every reference point;
        residual) are then computed for the whole batch at once: a batch mixes many clients
        with a query or two each, and one matrix product per batch costs far less than one
        per client. Repeats (most of a what-if user's traffic) never reach the reference.
        """
        dim = matrix.shape[1]
        thresholds = profile.thresholds[policy.sensitivity]
        held = self._held_out_for(profile)
        matched = []
        accepted = 0
        for client in clients.values():
            if client.other_dimension:
                self.stats.unparsable["dimension"] += client.other_dimension
            if not client.rows:
                continue
            X = matrix[client.rows]
            y = np.asarray(client.labels, dtype=np.int16)
            accepted += len(X)
            tracked = self._tracked(policy.key, client.key, dim, now)
            if tracked.state.dim != dim:  # first seen through a gap, before any row
                unobserved, tracked.state = tracked.state.unobserved, ClientState(dim=dim)
                tracked.state.unobserved = unobserved
            matched.append((client.key, tracked, tracked.state.match(X, y, thresholds)))
            if held is not None:
                if tracked.risk is None:
                    tracked.risk = RiskSample(dim)
                tracked.risk.add(X, y)
        fresh = [F for _, _, F in matched if len(F)]
        if fresh:
            everything = np.concatenate(fresh)
            if profile.reference is not None:
                novelty = profile.reference.novelty(everything)
                residual = profile.reference.residual(everything)
            else:  # no reference: nothing to compare with (those detectors do not run)
                novelty = residual = np.zeros(len(everything), dtype=np.float32)
        start = 0
        for client_key, tracked, F in matched:
            if len(F):
                end = start + len(F)
                tracked.state.fold(
                    novelty[start:end], residual[start:end], thresholds, everything[start:end]
                )
                start = end
            if held is not None and tracked.risk is not None and tracked.risk.due():
                tracked.risk.update(held)
                self._assess(policy, client_key, tracked, now)
            self._judge(policy, profile, client_key, tracked, now)
        return accepted

    def _held_out_for(self, profile: Profile) -> HeldOut | None:
        """The profile's held-out rows and answers, read once per profile."""
        cached = self._held.get(id(profile))
        if cached is None or cached[0] is not profile:
            held = self._held_out(profile)
            if held is not None and held.dim != profile.dim:
                log.error("%s: held-out rows of another dimension: no risk estimate", profile.name)
                held = None
            cached = self._held[id(profile)] = (profile, held)
        return cached[1]

    def _tenant(self, client_key: str) -> str:
        tenant = self.tenant_of(client_key) if self.tenant_of is not None else None
        return tracking_key(tenant or client_key)

    def _forget(self, key: tuple[str, str], tracked: Tracked) -> None:
        members = self._tenants.get((key[0], tracked.tenant))
        if members is not None:
            members.pop(key[1], None)
            if not members:
                del self._tenants[(key[0], tracked.tenant)]

    def _evict(self, key: tuple[str, str]) -> None:
        tracked = self._clients.pop(key)
        self._forget(key, tracked)
        self.stats.evicted += 1
        self.stats.evicted_by_tenant[tracked.tenant] += 1

    def _tracked(self, policy: str, client_key: str, dim: int, now: float) -> Tracked:
        filed = tracking_key(client_key)
        key = (policy, filed)
        tracked = self._clients.get(key)
        if tracked is None:
            if filed != client_key:
                self.stats.long_keys += 1
            tracked = Tracked(ClientState(dim=dim), tenant=self._tenant(client_key))
            members = self._tenants.setdefault((policy, tracked.tenant), OrderedDict())
            # A tenant over its share evicts its own least recently seen client first, so
            # many keys of one tenant cannot push other tenants' state out of the table.
            while members and len(members) >= self.max_clients_per_tenant:
                self._evict((policy, next(iter(members))))
            self._clients[key] = tracked
            members[filed] = None
            while len(self._clients) > self.max_clients:
                self._evict(next(iter(self._clients)))
        else:
            self._clients.move_to_end(key)
            mine = self._tenants.get((policy, tracked.tenant))
            if mine is not None and filed in mine:
                mine.move_to_end(filed)
        tracked.last_seen = now
        return tracked

    def _expire(self, now: float) -> None:
        while self._clients:
            key, oldest = next(iter(self._clients.items()))
            if now - oldest.last_seen < self.idle_ttl:
                return
            del self._clients[key]
            self._forget(key, oldest)
            self.stats.expired += 1

    # --- verdicts ---------------------------------------------------------------------------

    def _judge(
        self,
        policy: WatchedPolicy,
        profile: Profile | None,
        client_key: str,
        tracked: Tracked,
        now: float,
    ) -> None:
        if tracked.stage == "detected":
            return
        state = tracked.state
        # Statistics are looked at every EVALUATE_EVERY queries of a client, the grain they
        # were calibrated at: more looks would mean more false positives (and more CPU).
        if state.queries + state.unobserved < tracked.evaluated + EVALUATE_EVERY:
            return
        tracked.evaluated = state.queries + state.unobserved
        findings: list[Finding] = []
        decisive = DECISIVE_WITHOUT_REFERENCE
        thresholds: Thresholds | None = None
        if profile is not None:
            thresholds = profile.thresholds[policy.sensitivity]
            detectors = policy.detectors
            if profile.reference is None:  # reference-free, or still calibrating
                detectors = tuple(d for d in detectors if d in ("prada", "nearDuplicate"))
            elif any(d in DECISIVE for d in detectors):
                decisive = DECISIVE
            findings = [f for f in state.findings(thresholds, detectors) if f.fired]
        evidence = [Evidence(f.detector, f.statistic, f.threshold, f.queries) for f in findings]
        if tracked.stage == "watching":
            seen = state.queries + state.unobserved
            if state.unobserved >= UNOBSERVED_MIN and state.unobserved * 2 > seen:
                evidence.append(
                    Evidence("unobserved", state.unobserved / seen, 0.5, state.queries)
                )
            if any(e.detector not in ALERT_ONLY for e in evidence):
                tracked.stage, tracked.suspected_at = "suspected", state.stored
                self._suspicion(policy, client_key, tuple(evidence), now, _peak(tracked))
            elif evidence and not tracked.alerted:
                # Probing around a few points: what explanation tools do. Worth an alert.
                tracked.alerted = True
                self._emit(
                    Verdict(self._ref(policy, client_key), "suspicion", "alert",
                            tuple(evidence), now)
                )
            return
        # The throttle comes first: only a client that goes on sending new queries after
        # its suspicion (repeats do not count) can be confirmed — by a second detector, by a
        # statistic far past its threshold, or by the same evidence ``confirm`` queries on.
        since = state.stored - tracked.suspected_at
        confirmed = since >= CONFIRM_MIN and (
            len(findings) >= 2
            or any(f.statistic >= ESCALATE * f.threshold for f in findings)
            or since >= self.confirm
        )
        if confirmed and (
            any(f.detector in DECISIVE_ANY_SPREAD for f in findings)
            or (
                any(self._decisive(f, decisive, thresholds, state) for f in findings)
                and self._spread_out(profile, state)
            )
        ):
            tracked.stage = "detected"
            self._detection(policy, client_key, tuple(evidence), now, _peak(tracked))

    @staticmethod
    def _decisive(
        finding: Finding,
        decisive: frozenset[str],
        thresholds: Thresholds | None,
        state: ClientState,
    ) -> bool:
        """Whether a fired finding may ground a quarantine (with the spread floor).

        ``coverage`` only with the effect as well as the significance: the client's mean
        residual (its lower confidence bound, ``ClientState.lower_mean``: early means of a
        few dozen queries swing) beyond the 99th percentile of natural queries' (``Thresholds.
        residual_cut``, from the reference's held-out rows). Its z score grows with the
        square root of the queries for any population a little off the data's subspace, so
        a long partial-dependence plot, a batch with mean-imputed inputs or SHAP coalitions
        over several instances (0.3-0.7 standard deviations off on the digits) reached it,
        and a throttle became a 24 h quarantine 16 queries later; noise is 8 standard
        deviations off, the typical query beyond the natural 99th percentile.
        ``outOfDistribution`` likewise: the client's mean novelty beyond the natural 99th
        percentile (``Thresholds.novelty_gate``, the cut it counts novel queries by), not
        only more novel queries than the natural rate allows: KernelSHAP's coalitions
        (5-19% of them novel, natural digits 1-3%) and test-time augmentation of centred
        digits (36%) were quarantined; noise, photo patches and noise interleaved 1:1
        with natural digits are typically beyond it (mean novelty 1.1-2.0 times the cut
        on the digits, those clients 0.7-0.98). Both conditions hold only where the
        reference's held-out rows estimate a 99th percentile (``calibrate.MIN_TAIL_ROWS``;
        not the wine data's 33): elsewhere the significance alone decides, as before.
        ``prada`` (not decisive with reference data: narrow users fooled it at its
        threshold) at ``ESCALATE`` times its threshold, 2.5 times the most any simulated
        benign client reached: streams of perturbed copies of a few seeds (sign steps)
        reach 3 times it while being only a standard deviation off the subspace."""
        if finding.detector == "coverage" and finding.detector in decisive:
            cut = thresholds.residual_cut if thresholds is not None else 0.0
            mean = state.lower_mean("residual")
            return cut <= 0 or (mean is not None and mean >= cut)
        if finding.detector == "outOfDistribution" and finding.detector in decisive:
            cut = thresholds.novelty_gate if thresholds is not None else 0.0
            mean = state.lower_mean("novelty")
            return cut <= 0 or (mean is not None and mean >= cut)
        if finding.detector in DECISIVE_ESCALATED and decisive is DECISIVE:
            return finding.statistic >= ESCALATE * finding.threshold
        return finding.detector in decisive

    @staticmethod
    def _spread_out(profile: Profile | None, state: ClientState) -> bool:
        """Whether the client's fresh queries cover enough of the space for a quarantine:
        their dispersion at least ``SPREAD_MIN`` of the reference's. A client exploring
        around a few inputs (SHAP coalitions, LIME samples, what-if edits) stays below it
        even when its perturbations are unlike natural data: it can only learn the model
        near those inputs, so it is at most throttled. Without reference data there is
        no natural dispersion to compare with, and this does not apply."""
        if profile is None or profile.reference is None or profile.reference.spread <= 0:
            return True
        dispersion = state.dispersion()
        return dispersion is not None and dispersion >= SPREAD_MIN * profile.reference.spread

    def _ref(self, policy: WatchedPolicy, client_key: str) -> ClientRef:
        # Digested here: no raw key reaches the verdict store, events or admin answers.
        return ClientRef.of(policy.key, client_key, policy.key_source, policy.key_header)

    def _emit(self, verdict: Verdict) -> None:
        self.stats.verdicts[f"{verdict.stage}:{verdict.action}"] += 1
        try:
            self.sink.emit(verdict)
        except Exception:  # a broken exporter must never stop enforcement
            log.exception("could not emit verdict %s", verdict.summary())

    def _suspicion(
        self,
        policy: WatchedPolicy,
        client_key: str,
        evidence: tuple[Evidence, ...],
        now: float,
        fidelity: float | None = None,
    ) -> None:
        client = self._ref(policy, client_key)
        # An absent client key cannot be told apart at the sidecar: alert only.
        enforce = policy.throttle is not None and client_key != ""
        action: Literal["throttle", "alert"] = "throttle" if enforce else "alert"
        self._emit(Verdict(client, "suspicion", action, evidence, now, fidelity))
        if enforce and policy.throttle is not None:
            requests, per = policy.throttle
            self.throttler.throttle(
                Enforcement(
                    kind="throttle",
                    client=client,
                    since=now,
                    until=now + (policy.quarantine_seconds or DEFAULT_THROTTLE_SECONDS),
                    reason=evidence[0].detector,
                    requests=requests,
                    per_seconds=per,
                )
            )

    def _detection(
        self,
        policy: WatchedPolicy,
        client_key: str,
        evidence: tuple[Evidence, ...],
        now: float,
        fidelity: float | None = None,
    ) -> None:
        client = self._ref(policy, client_key)
        enforce = policy.quarantine_seconds is not None and client_key != ""
        action: Literal["quarantine", "alert"] = "quarantine" if enforce else "alert"
        self._emit(Verdict(client, "detection", action, evidence, now, fidelity))
        if enforce and policy.quarantine_seconds is not None:
            self.verdicts.put(
                Enforcement(
                    kind="quarantine",
                    client=client,
                    since=now,
                    until=now + policy.quarantine_seconds,
                    reason=", ".join(e.detector for e in evidence),
                )
            )

    def _assess(
        self, policy: WatchedPolicy, client_key: str, tracked: Tracked, now: float
    ) -> None:
        """Apply ``onRisk`` to a client's new estimate: the highest step its peak reached.

        A knowledge budget, not a detector verdict: it hardens and throttles, never
        quarantines; a step holds ``duration`` after the estimate that last confirmed it.
        What is in force is renewed when half of its time has run, so an active client's
        sidecars are not recompiled at every estimate.
        """
        plan, risk = policy.on_risk, tracked.risk
        if plan is None or risk is None or client_key == "":
            return  # an absent client key cannot be told apart at the sidecar
        reached = risk.peak
        tiers = plan.tiers(reached)
        throttle = plan.throttle_step(reached)
        new_tiers = tiers != tracked.risk_tiers
        new_throttle = throttle is not None and throttle[0] > tracked.risk_throttle
        renew = bool(tiers or throttle) and now >= tracked.risk_until - plan.seconds / 2
        if not (new_tiers or new_throttle or renew):
            return
        client = self._ref(policy, client_key)
        until = now + plan.seconds
        if tiers:
            if new_tiers:
                threshold = max(t for _, steps in plan.harden for t, _ in steps if t <= reached)
                evidence = (Evidence("risk", reached, threshold, risk.distinct),)
                self._emit(Verdict(client, "risk", "harden", evidence, now, reached))
            self.hardened.put(Hardened(client, now, until, tiers, reached))
        if throttle is not None:
            threshold, requests, per = throttle
            if new_throttle:
                evidence = (Evidence("risk", reached, threshold, risk.distinct),)
                self._emit(Verdict(client, "risk", "throttle", evidence, now, reached))
            self.throttler.throttle(
                Enforcement("throttle", client, now, until, "risk", requests, per)
            )
            tracked.risk_throttle = threshold
        tracked.risk_tiers = tiers
        tracked.risk_until = until

    # --- admin ------------------------------------------------------------------------------

    def release(self, key: str, policy: str | None = None) -> list[Enforcement]:
        """End a client's quarantine and throttle, and forget what it was suspected of."""
        with self._lock:
            tracked = tracking_key(key)
            # By the key itself, its digest or its fingerprint (what `quarantine list` shows).
            for client in [
                c for c in self._clients if c[1] == tracked or matches(key, c[1], digested=False)
            ]:
                if policy is None or client[0] == policy:
                    self._forget(client, self._clients.pop(client))
        self.throttler.release(key, policy)
        self.hardened.release(key, policy)
        return self.verdicts.release(key, policy)

    def clients(self) -> list[tuple[str, str, str, int, int]]:
        """(policy, client key, stage, queries, unobserved) of every tracked client, for the
        live page (telemetry/page.py): copied under the lock, nothing computed."""
        with self._lock:
            return [
                (policy, key, t.stage, t.state.queries, t.state.unobserved)
                for (policy, key), t in self._clients.items()
            ]

    def risks(self) -> list[tuple[str, str, float, int]]:
        """(policy, client as shown, estimated fidelity, distinct pairs) of every tracked
        client with an estimate, highest first. Clients are named as admin answers name
        them (``ClientRef.shown``): a secret header key by its fingerprint."""
        with self._lock:
            found = []
            for (policy, key), t in self._clients.items():
                if t.risk is None or t.risk.estimate is None:
                    continue
                watched = self._watched.get(policy)
                ref = (
                    ClientRef.of(policy, key, watched.key_source, watched.key_header)
                    if watched is not None
                    else ClientRef.of(policy, key)
                )
                found.append((policy, ref.shown, t.risk.peak, t.risk.distinct))
        return sorted(found, key=lambda r: (-r[2], r[0], r[1]))

    def client_count(self) -> int:
        return len(self._clients)

    def counters(self) -> tuple[MonitorStats, int]:
        """A consistent copy of the counters, and the clients tracked, for the admin API."""
        with self._lock:
            return self.stats.copy(), len(self._clients)


def _peak(tracked: Tracked) -> float | None:
    risk = tracked.risk
    return risk.peak if risk is not None and risk.estimate is not None else None
