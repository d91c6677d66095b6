"""The extraction benchmark: the product's own scoreboard.

A real victim (the demo digits model) behind a real Envoy sidecar configured by a real
control plane with an ExtractionPolicy (top-1 + 2-digit rounding, all four detectors at
``medium``, throttle then quarantine). Attackers and benign clients speak HTTP through the
sidecar, one query per request, each with its own API key. The monitor gets every answered
query: from the sidecar's own WASM feed when it is there, otherwise this harness reports
each request with the model's unhardened answer through the real ``QueryFeed.Report``
gRPC service, as the sidecar would (``--feed`` says which).

Per attack and for benign traffic it prints: queries until detection (median, p90),
detection rate, false-positive rate over benign clients, fidelity and accuracy of the
attacker's substitute at fixed budgets without the defense (raw probabilities, no
monitor) and with it (the answers the sidecar actually gave, none after the quarantine),
and benign utility loss (top-1 changes, mean probability shift). JSON with ``--json``.

Two models (issue 13): the demo digits model and a 30-feature breast-cancer classifier
(``models.py``), each with its own ExtractionPolicy naming its reference data; the control
plane calibrates each profile itself before any client runs. Benign clients are reported in
two groups: the generators calibration uses (other seeds) and the HELD-OUT generators it
never sees (``calibrate.HELD_OUT_KINDS``: feature sweeps, SHAP-style coalitions, cluster
segments), plus, on digits, scikit-learn's own images of each class sent one by one.

    .venv/bin/python bench/extraction/run.py [--repeats 3] [--json out.json] \
        [--models digits,cancer]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from attacks import Answer, Spec, scenario  # noqa: E402
from models import breast_cancer_model, cancer_scenario, reference_csv  # noqa: E402
from models import serve as serve_any  # noqa: E402

from controlplane.app.server import ControlPlane, ControlPlaneConfig  # noqa: E402
from controlplane.compile.inputs.inventory import Sidecar  # noqa: E402
from controlplane.gen.modelguard.feed.v1 import feed_pb2, feed_pb2_grpc  # noqa: E402
from controlplane.local.envoy import EnvoyProcess  # noqa: E402
from controlplane.local.model import load_model, serve  # noqa: E402
from controlplane.local.model import reference_csv as digits_reference_csv  # noqa: E402
from controlplane.netutil import free_port  # noqa: E402
from controlplane.sidecar.bootstrap import build_bootstrap  # noqa: E402

POLICY = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {{name: {service}, namespace: demo}}
spec:
  targetRef: {{service: {service}}}
  clientKey: {{header: x-api-key}}
  request: {{features: "$.instances[*]"}}
  response: {{scores: "$.predictions[*].probabilities"}}
  output: {{topK: 1, roundDigits: 2}}
  detection:
    detectors: [prada, nearDuplicate, outOfDistribution, coverage]
    sensitivity: medium
    reference: {{file: reference.csv, labelColumn: label}}
  actions:
    onSuspicion: {{throttle: {{requests: 60, per: minute}}}}
    onDetection: {{quarantine: {{duration: 24h}}}}
"""
BUDGETS = (100, 300, 1000)
REPORT_EVERY = 8


# --- the system under test -----------------------------------------------------------------------


@dataclass
class Victim:
    """One model under test: how to serve it, its reference data, its clients."""

    name: str
    service: str
    model: Any  # predict_proba, predict, test_X, test_y
    classes: int
    reference: str  # CSV with the model's own class in a ``label`` column
    serve: Any  # () -> a server with .port and .stop()
    specs: list[Spec]
    scale: np.ndarray  # what the attacker's substitute divides features by


def digits_victim() -> Victim:
    model = load_model(0)
    return Victim("digits", "digits-model", model, 10, digits_reference_csv(model),
                  lambda: serve(0, model=model), scenario(model.test_X, model.test_X),
                  np.full(64, 16.0))


def cancer_victim() -> Victim:
    model = breast_cancer_model(0)
    return Victim("breast-cancer", "cancer-model", model, 2,
                  reference_csv(model.train_X, model.predict(model.train_X)),
                  lambda: serve_any(model.predict_proba), cancer_scenario(model),
                  model.train_X.std(axis=0) + 1e-9)


VICTIMS = {"digits": digits_victim, "cancer": cancer_victim}


class System:
    def __init__(self, workdir: Path, victim: Victim) -> None:
        self.workdir = workdir
        self.victim = victim
        self.model_server = victim.serve()
        policies = workdir / "policies"
        policies.mkdir()
        (policies / "extraction.yaml").write_text(POLICY.format(service=victim.service))
        (policies / "reference.csv").write_text(victim.reference)
        self.xds, self.admin, self.listen, envoy_admin = (free_port() for _ in range(4))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        config = ControlPlaneConfig(
            policy_paths=(str(policies),), xds_port=self.xds, admin_port=self.admin,
            debounce_quiet=0.05, debounce_max=0.3,
            verdicts_path=str(workdir / "state" / "verdicts.json"),  # profiles cached there
        )
        self.plane = ControlPlane(config)
        asyncio.run_coroutine_threadsafe(self.plane.start(), self.loop).result(30)
        started = time.monotonic()
        key = f"demo/{victim.service}"
        while (found := self.plane.extraction.profiles.conditions().get(key)) is None or (
            found.status != "True"
        ):  # the control plane calibrates the policy from its reference data first
            if found is not None and found.reason == "Failed":
                raise RuntimeError(f"calibration failed: {found.message}")
            time.sleep(0.5)
        print(f"{victim.name}: calibrated in {time.monotonic() - started:.0f}s ({found.message})",
              flush=True)
        sidecar = Sidecar(
            node_id=f"{victim.service}-0", service=victim.service, namespace="demo",
            identity=f"spiffe://cluster.local/ns/demo/sa/{victim.service}",
            app_port=self.model_server.port, inbound_port=self.listen,
            inbound_address="127.0.0.1",
        )
        self.envoy = EnvoyProcess(
            build_bootstrap(sidecar, xds_host="127.0.0.1", xds_port=self.xds,
                            admin_port=envoy_admin),
            admin_port=envoy_admin, log_path=workdir / "envoy.log", log_level="warn",
        )
        self.envoy.start()
        self.envoy.wait_ready(60)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.xds}")
        self.feed = feed_pb2_grpc.QueryFeedStub(self.channel)
        self.self_report = True

    def stop(self) -> None:
        self.channel.close()
        self.envoy.stop()
        asyncio.run_coroutine_threadsafe(self.plane.stop(grace=0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.model_server.stop()

    def enforcement(self, key: str) -> str | None:
        # The store keeps a header key's digest: match the key through it.
        kinds = {e.kind for e in self.plane.extraction.verdicts.active() if e.client.named_by(key)}
        return "quarantine" if "quarantine" in kinds else ("throttle" if kinds else None)


class Connection:
    """One client's keep-alive HTTP connection to the sidecar."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def predict(self, key: str, row: np.ndarray) -> tuple[int, bytes, bytes]:
        body = json.dumps({"instances": [[float(v) for v in row]]}).encode()
        for attempt in range(2):
            try:
                self.conn.request("POST", "/v1/predict", body,
                                  {"content-type": "application/json", "x-api-key": key})
                response = self.conn.getresponse()
                return response.status, body, response.read()
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                if attempt:
                    raise
        raise AssertionError("unreachable")


# --- running one client --------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    kind: str
    sent: int = 0
    detected_at: int | None = None  # queries sent when the quarantine verdict was in force
    suspected_at: int | None = None
    blocked_at: int | None = None  # first 403
    throttled: int = 0  # 429 answers
    queries: list[np.ndarray] = field(default_factory=list)
    answers: list[dict[int, float] | None] = field(default_factory=list)  # None: refused
    raw: list[np.ndarray] = field(default_factory=list)  # the model's unhardened scores


def parse_answer(body: bytes) -> dict[int, float]:
    prediction = json.loads(body)["predictions"][0]
    scores = prediction.get("probabilities")
    if not scores:
        return {int(prediction["label"]): 1.0}
    return {i: float(p) for i, p in enumerate(scores) if p}


def run_client(system: System, model: Any, spec: Spec, seed: int) -> Outcome:
    rng = np.random.default_rng(seed)
    keys = [f"{spec.kind}-{seed}-{k}" for k in range(spec.keys)]
    per_key = spec.budget // spec.keys
    clients = [spec.make(rng, per_key) for _ in keys]
    connection = Connection(system.listen)
    outcome = Outcome(spec.name, spec.kind)
    pending: list[Answer] = [None] * len(keys)
    started = [False] * len(keys)
    done = [False] * len(keys)
    batches: dict[str, feed_pb2.FeedBatch] = {}
    while not all(done):
        for i, client in enumerate(clients):
            if done[i]:
                continue
            try:
                rows = next(client) if not started[i] else client.send(pending[i])
                started[i] = True
            except StopIteration:
                done[i] = True
                continue
            answers: list[dict[int, float]] = []
            refused = False
            for row in rows:
                status, body, reply = connection.predict(keys[i], row)
                outcome.sent += 1
                raw = model.predict_proba(row[None])[0]
                outcome.queries.append(row)
                outcome.raw.append(raw)
                if status == 200:
                    answer = parse_answer(reply)
                    answers.append(answer)
                    outcome.answers.append(answer)
                    if system.self_report:
                        batch = batches.setdefault(
                            keys[i], feed_pb2.FeedBatch(node_id="bench",
                                                    policy=f"demo/{system.victim.service}")
                        )
                        raw_reply = json.dumps({"predictions": [
                            {"label": int(raw.argmax()), "probabilities": raw.tolist()}]})
                        batch.queries.add(client_key=keys[i], status=200, request_body=body,
                                          response_body=raw_reply.encode())
                        if len(batch.queries) >= REPORT_EVERY:
                            system.feed.Report(batches.pop(keys[i]), timeout=10)
                else:
                    outcome.answers.append(None)
                    if status == 429:
                        outcome.throttled += 1
                        answers.append({})
                    elif status == 403:
                        outcome.blocked_at = outcome.blocked_at or outcome.sent
                        refused = True
                        break
                    else:
                        raise AssertionError(f"unexpected status {status}: {reply[:200]!r}")
                state = system.enforcement(keys[i])
                if state is not None and outcome.suspected_at is None:
                    outcome.suspected_at = outcome.sent
                # An attack over several keys is stopped when every one of them is.
                if outcome.detected_at is None and all(
                    system.enforcement(k) == "quarantine" for k in keys
                ):
                    outcome.detected_at = outcome.sent
            if refused:
                done[i] = True
                pending[i] = None
                continue
            # A throttled query got no answer; adaptive attacks see the others.
            pending[i] = [a if a else {0: 0.0} for a in answers]
    for batch in batches.values():
        system.feed.Report(batch, timeout=10)
    # The monitor may decide on the last batch: look once more.
    if outcome.detected_at is None and all(system.enforcement(k) == "quarantine" for k in keys):
        outcome.detected_at = outcome.sent
    connection.conn.close()
    return outcome


# --- the attacker's substitute -------------------------------------------------------------------


def substitute_quality(
    victim: Victim, X: np.ndarray, answers: list[dict[int, float] | None], equation: bool
) -> tuple[float, float]:
    """(fidelity, accuracy) on the test split of a substitute trained on what was answered."""
    from sklearn.linear_model import LogisticRegression

    model, n = victim.model, victim.classes
    keep = [i for i, a in enumerate(answers) if a]
    test_X, test_y = model.test_X, model.test_y
    victim_labels = model.predict(test_X)
    if not keep:
        guess = np.zeros(len(test_X), dtype=int)
        return float((guess == victim_labels).mean()), float((guess == test_y).mean())
    Xk = X[keep] / victim.scale
    labels = np.array([max(answers[i], key=answers[i].__getitem__) for i in keep])
    full = [answers[i] for i in keep]
    if equation and all(len(a) == n and min(a.values()) > 0 for a in full):
        # Tramèr et al.: log(p_c / p_0) is linear in x; least squares recovers the model.
        P = np.array([[a[c] for c in range(n)] for a in full])
        logratio = np.log(P[:, 1:]) - np.log(P[:, :1])
        A = np.hstack([Xk, np.ones((len(Xk), 1))])
        W, *_ = np.linalg.lstsq(A, logratio, rcond=None)
        logits = np.hstack([np.zeros((len(test_X), 1)), (test_X / victim.scale) @ W[:-1] + W[-1]])
        predicted = logits.argmax(axis=1)
    elif len(set(labels.tolist())) < 2:
        predicted = np.full(len(test_X), labels[0])
    else:
        sub = LogisticRegression(max_iter=1000).fit(Xk, labels)
        predicted = sub.predict(test_X / victim.scale)
    return float((predicted == victim_labels).mean()), float((predicted == test_y).mean())


def undefended(model: Any, spec: Spec, seed: int) -> tuple[np.ndarray, list[Any]]:
    """The same attack against the raw API (full probabilities, nobody watching)."""
    rng = np.random.default_rng(seed)
    client = spec.make(rng, spec.budget)
    X: list[np.ndarray] = []
    answers: list[dict[int, float]] = []
    reply: Answer = None
    started = False
    while True:
        try:
            rows = client.send(reply) if started else next(client)
            started = True
        except StopIteration:
            break
        P = model.predict_proba(np.asarray(rows))
        reply = [{c: float(p) for c, p in enumerate(row)} for row in P]
        X.extend(rows)
        answers.extend(reply)
    return np.asarray(X), answers


# --- the scoreboard ------------------------------------------------------------------------------


def percentile(values: list[int], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="modelguard extraction benchmark")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each attack")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--feed", choices=("auto", "self", "sidecar"), default="auto")
    parser.add_argument("--models", default="digits,cancer", help="comma-separated: digits,cancer")
    parser.add_argument("--only", default="",
                        help="comma-separated substrings: run only the clients so named")
    args = parser.parse_args(argv)

    everything: dict[str, Any] = {}
    for name in args.models.split(","):
        victim = VICTIMS[name]()
        with tempfile.TemporaryDirectory(prefix="modelguard-bench-") as tmp:
            system = System(Path(tmp), victim)
            try:
                everything[victim.name] = _run(system, victim, args)
            finally:
                system.stop()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(everything, indent=1))
    return 0


def _probe_feed(system: System, victim: Victim) -> tuple[bool, bool]:
    """Whether the sidecar feeds the monitor itself, and whether it hardens answers."""
    connection = Connection(system.listen)
    before = system.plane.extraction.monitor.stats.batches
    hardened = False
    for row in victim.model.test_X[:20]:
        status, _, reply = connection.predict("probe", row)
        hardened = hardened or (status == 200 and len(parse_answer(reply)) < victim.classes)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if system.plane.extraction.monitor.stats.batches > before:
            return True, hardened
        time.sleep(0.1)
    return False, hardened


def _run(system: System, victim: Victim, args: argparse.Namespace) -> dict[str, Any]:
    model = victim.model
    sidecar_feed, hardened = _probe_feed(system, victim)
    system.self_report = args.feed == "self" or (args.feed == "auto" and not sidecar_feed)
    print(f"feed: {'harness → QueryFeed.Report' if system.self_report else 'sidecar WASM feed'}"
          f"; sidecar output hardening: {'on' if hardened else 'OFF (answers not hardened)'}",
          flush=True)
    only = [o for o in args.only.split(",") if o]
    specs = [s for s in victim.specs if not only or any(o in s.name for o in only)]
    results: dict[str, Any] = {"feed": "harness" if system.self_report else "sidecar",
                               "hardening": hardened, "attacks": {}, "benign": {}}
    started = time.monotonic()
    benign: list[Outcome] = []
    benign_seeds: list[tuple[Outcome, int]] = []  # each benign client with its key's seed
    groups: dict[str, list[Outcome]] = {}
    for index, spec in enumerate(specs):
        repeats = args.repeats if spec.kind == "attack" else 1
        outcomes = [run_client(system, model, spec, seed=1000 * index + r)
                    for r in range(repeats)]
        if spec.kind != "attack":  # "benign" (calibration's generators) or "held-out"
            benign.extend(outcomes)
            benign_seeds.extend((o, 1000 * index + r) for r, o in enumerate(outcomes))
            groups.setdefault(spec.kind, []).extend(outcomes)
            continue
        detected = [o.detected_at for o in outcomes if o.detected_at is not None]
        row: dict[str, Any] = {
            "runs": repeats,
            "detection_rate": len(detected) / repeats,
            "queries_to_detection_median": statistics.median(detected) if detected else None,
            "queries_to_detection_p90": percentile(detected, 90),
            "queries_to_suspicion_median": statistics.median(
                [o.suspected_at for o in outcomes if o.suspected_at is not None] or [0]),
            "fidelity": {}, "accuracy": {},
        }
        equation = spec.name.startswith("equation")
        X0, A0 = undefended(model, spec, 1000 * index)
        o = outcomes[0]
        X1 = np.asarray(o.queries)
        row["risk_undefended"] = {}
        for budget in BUDGETS:
            f0, a0 = substitute_quality(victim, X0[:budget], A0[:budget], equation)
            row["risk_undefended"][budget] = {
                "estimated": offline_estimate(victim, X0[:budget]), "true": f0}
            f1, a1 = substitute_quality(victim, X1[:budget], o.answers[:budget], equation)
            row["fidelity"][budget] = {"without": f0, "with": f1}
            row["accuracy"][budget] = {"without": a0, "with": a1}
        row["risk"] = risk_row(system, victim, spec, outcomes[0], 1000 * index, equation)
        results["attacks"][spec.name] = row
        print(f"  {spec.name}: detected {len(detected)}/{repeats} at {detected}", flush=True)
    flagged = [o for o in benign if o.suspected_at is not None or o.detected_at is not None]
    top1 = shift = n = 0.0
    for o in benign:
        for answer, raw in zip(o.answers, o.raw, strict=True):
            if not answer:
                continue
            got = np.zeros(victim.classes)
            for c, p in answer.items():
                got[c] = p
            top1 += int(got.argmax() != raw.argmax())
            shift += float(np.abs(got - raw).mean())
            n += 1
    results["benign"] = {
        "clients": len(benign),
        "queries": int(n),
        "flagged": [o.name for o in flagged],
        "false_positive_rate": len(flagged) / len(benign) if benign else 0.0,
        "top1_changes": top1 / n if n else 0.0,
        "mean_probability_shift": shift / n if n else 0.0,
        # Per group: the calibration's generators (other seeds) and the held-out ones.
        "groups": {
            kind: {
                "clients": len(group),
                "throttled": sorted(o.name for o in group if o.suspected_at is not None),
                "quarantined": sorted(o.name for o in group if o.detected_at is not None),
            }
            for kind, group in groups.items()
        },
    }
    results["benign"]["estimated_fidelity"] = {
        o.name: estimated_fidelity(system, [f"{o.kind}-{seed}-0"]) for o, seed in benign_seeds
    }
    results["risk_correlation"] = risk_correlation(results["attacks"])
    results["risk_correlation_undefended"] = undefended_correlation(results["attacks"])
    results["seconds"] = round(time.monotonic() - started, 1)
    results["monitor"] = {
        "batches": system.plane.extraction.monitor.stats.batches,
        "queries": system.plane.extraction.monitor.stats.queries,
    }
    print_table(results, victim.name)
    return results


# --- the extraction-risk estimate next to the truth ------------------------------------------


def estimated_fidelity(system: System, keys: list[str]) -> float | None:
    """The monitor's estimate for a client (risk.py): the highest over its keys, each of
    which the monitor tracks on its own."""
    from controlplane.extraction.verdicts import ClientRef

    # The monitor names API keys as admin answers do: by fingerprint.
    policy = f"demo/{system.victim.service}"
    names = {ClientRef.of(policy, k, "header", "x-api-key").shown for k in keys}
    found = [f for _, key, f, _ in system.plane.extraction.monitor.risks() if key in names]
    return max(found) if found else None


def risk_row(
    system: System, victim: Victim, spec: Spec, o: Outcome, seed: int, equation: bool
) -> dict[str, Any]:
    """An attacker's estimated extraction fidelity next to the true fidelity of its substitute
    trained on everything it was answered (hardened, as the sidecar sent it)."""
    keys = [f"{spec.kind}-{seed}-{k}" for k in range(spec.keys)]
    true, _ = substitute_quality(victim, np.asarray(o.queries), o.answers, equation)
    return {"estimated": estimated_fidelity(system, keys), "true": true, "sent": o.sent}




def offline_estimate(victim: Victim, X: np.ndarray) -> float:
    """The monitor's estimate (risk.py) for a stream it never saw, scored on the test split
    (where substitute_quality scores the substitutes)."""
    from controlplane.extraction.risk import HeldOut, RiskSample

    model = victim.model
    held = HeldOut.of(model.test_X, model.predict(model.test_X))
    sample = RiskSample(X.shape[1])
    sample.add(np.asarray(X, dtype=np.float32), model.predict(X).astype(np.int16))
    return sample.update(held)


def risk_correlation(attacks: dict[str, Any]) -> float | None:
    pairs = [(r["risk"]["estimated"], r["risk"]["true"]) for r in attacks.values()
             if r["risk"]["estimated"] is not None]
    return correlation(pairs)


def undefended_correlation(attacks: dict[str, Any]) -> float | None:
    return correlation([(v["estimated"], v["true"]) for r in attacks.values()
                        for v in r["risk_undefended"].values()])


def correlation(pairs: list[tuple[float, float]]) -> float | None:
    if len(pairs) < 3:
        return None
    est, true = np.asarray(pairs).T
    if est.std() == 0 or true.std() == 0:
        return None
    return float(np.corrcoef(est, true)[0, 1])


def print_risk(results: dict[str, Any]) -> None:
    print(f"\n{'attack':40s} {'sent':>5s} {'estimated fidelity':>19s} {'true fidelity':>14s}")
    for name, row in results["attacks"].items():
        r = row["risk"]
        print(f"{name:40s} {r['sent']:>5d} {_fmt(r['estimated'], '.2f'):>19s} "
              f"{r['true']:>14.2f}")
    print(f"correlation (Pearson, attackers): {_fmt(results['risk_correlation'], '.2f')}")
    print("\nundefended (raw answers, nobody watching): estimated → true fidelity at "
          + ", ".join(str(b) for b in BUDGETS) + " queries")
    for name, row in results["attacks"].items():
        cells = "  ".join(f"{row['risk_undefended'][b]['estimated']:.2f}→"
                          f"{row['risk_undefended'][b]['true']:.2f}" for b in BUDGETS)
        print(f"{name:40s} {cells}")
    print("correlation (Pearson, attackers x budgets): "
          f"{_fmt(results['risk_correlation_undefended'], '.2f')}")
    benign = results["benign"]["estimated_fidelity"]
    for kind in ("iid", "heavy", "what-if"):
        values = [v for k, v in benign.items() if f"benign {kind} " in k and v is not None]
        if values:
            print(f"benign {kind}: estimated fidelity {min(values):.2f}–{max(values):.2f}")


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict[str, Any], name: str = "") -> None:
    head = (f"{'attack':40s} {'det.':>5s} {'q.med':>6s} {'q.p90':>6s} "
            + " ".join(f"{'fid@' + str(b) + ' w/o→with':>17s}" for b in BUDGETS)
            + " " + f"{'acc@1000 w/o→with':>18s}")
    print(f"\n== {name}")
    print(head)
    for name, row in results["attacks"].items():
        fid = " ".join(
            f"{row['fidelity'][b]['without']:>8.2f}→{row['fidelity'][b]['with']:<8.2f}"
            for b in BUDGETS
        )
        acc = row["accuracy"][1000]
        print(f"{name:40s} {row['detection_rate']:>5.0%} "
              f"{_fmt(row['queries_to_detection_median']):>6s} "
              f"{_fmt(row['queries_to_detection_p90']):>6s} {fid} "
              f"{acc['without']:>9.2f}→{acc['with']:<8.2f}")
    b = results["benign"]
    print(f"\nbenign: {b['clients']} clients, {b['queries']} answered queries; "
          f"false positives {b['false_positive_rate']:.0%} {b['flagged']}; "
          f"top-1 changes {b['top1_changes']:.2%}; "
          f"mean probability shift {b['mean_probability_shift']:.4f}")
    for kind, group in b["groups"].items():
        print(f"  {kind}: {group['clients']} clients; throttled {len(group['throttled'])} "
              f"{group['throttled']}; quarantined {len(group['quarantined'])} "
              f"{group['quarantined']}")
    print(f"feed: {results['feed']}; hardening in the sidecar: {results['hardening']}; "
          f"{results['seconds']} s")
    print_risk(results)


if __name__ == "__main__":
    raise SystemExit(main())
