"""The monitor reads every request/response shape a policy can name (issue 13) the same
way, drops a query with a key that is not UTF-8 without failing its batch (issue 18.3),
and weighs unobserved answers by the rows they carried (issue 18.1)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from monitor_policy import POLICY, fixed_profile, policies

from controlplane.api import parse_documents
from controlplane.extraction.monitor import ExtractionMonitor
from controlplane.extraction.verdicts import InMemoryVerdictSink, VerdictStore
from controlplane.gen.modelguard.feed.v1 import feed_pb2
from controlplane.local.model import load_model

NAMES = [f"px{i}" for i in range(64)]


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return load_model(0)


def monitor(text: str = POLICY) -> ExtractionMonitor:
    loaded = policies(text)
    return ExtractionMonitor(
        lambda: loaded, VerdictStore(), InMemoryVerdictSink(), profile=fixed_profile
    )


def with_fields(request: str, response: str) -> str:
    return POLICY.replace('request: {features: "$.instances[*]"}', f"request: {request}").replace(
        'response: {scores: "$.predictions[*].probabilities"}', f"response: {response}"
    )


def tensor(name: str, rows: np.ndarray, nested: bool) -> dict[str, Any]:
    data = rows.tolist() if nested else rows.ravel().tolist()
    return {"name": name, "shape": list(rows.shape), "datatype": "FP32", "data": data}


def bodies(shape: str, X: np.ndarray, P: np.ndarray) -> tuple[bytes, bytes]:
    """One request of rows X and the model's answer P, in ``shape``."""
    if shape == "json":
        req: Any = {"instances": X.tolist()}
        resp: Any = {"predictions": [{"probabilities": p} for p in P.tolist()]}
    elif shape == "objects":
        req = {"instances": [dict(zip(NAMES, row, strict=True)) for row in X.tolist()]}
        resp = {"predictions": [{"probabilities": p} for p in P.tolist()]}
    elif shape in ("kserve", "kserve-nested"):
        nested = shape == "kserve-nested"
        # Two input tensors side by side: 40 + 24 columns.
        req = {"inputs": [tensor("a", X[:, :40], nested), tensor("b", X[:, 40:], nested)]}
        resp = {"outputs": [tensor("probabilities", P, nested)]}
    return json.dumps(req).encode(), json.dumps(resp).encode()


POLICIES = {
    "json": POLICY,
    "objects": with_fields(
        '{features: "$.instances[*]", featureNames: [' + ", ".join(NAMES) + "]}",
        '{scores: "$.predictions[*].probabilities"}',
    ),
    "kserve": with_fields(
        '{format: kserveV2, features: "$.inputs[*]"}',
        '{format: kserveV2, scores: "$.outputs[0]"}',
    ),
}
POLICIES["kserve-nested"] = POLICIES["kserve"]


def attack(model: Any, shape: str, per_request: int) -> tuple[ExtractionMonitor, int]:
    """Uniform noise, ``per_request`` rows a request, one request a batch, until the
    attacker is quarantined: the monitor and the rows it took."""
    mon = monitor(POLICIES[shape])
    rng = np.random.default_rng(7)
    X = rng.uniform(0, 16, size=(400, 64)).round(1)
    for start in range(0, len(X), per_request):
        rows = X[start : start + per_request]
        req, resp = bodies(shape, rows, model.predict_proba(rows))
        batch = feed_pb2.FeedBatch(policy="demo/digits-model")
        batch.queries.add(client_key="mallory", request_body=req, response_body=resp)
        assert mon.report(batch) == len(rows)
        if any(e.kind == "quarantine" for e in mon.verdicts.active()):
            return mon, start + len(rows)
    raise AssertionError("not quarantined")


@pytest.mark.parametrize("shape", ["objects", "kserve", "kserve-nested"])
def test_every_shape_is_judged_like_plain_rows(model: Any, shape: str) -> None:
    _, plain = attack(model, "json", 4)
    mon, rows = attack(model, shape, 4)
    assert rows == plain  # the same rows, the same state: the same verdict, as early
    assert not mon.stats.unparsable


def test_single_scores_give_classes_by_their_side_of_one_half(model: Any) -> None:
    mon = monitor(with_fields('{features: "$.instances[*]"}', '{scores: "$.predictions[*]"}'))
    X = model.test_X[:4]
    batch = feed_pb2.FeedBatch(policy="demo/digits-model")
    batch.queries.add(
        client_key="k",
        request_body=json.dumps({"instances": X.tolist()}).encode(),
        response_body=b'{"predictions": [0.9, 0.1, 0.5, 41.0]}',
    )
    assert mon.report(batch) == 4
    assert not mon.stats.unparsable  # scores read: one number per row


def test_rows_as_objects_missing_a_feature_are_junk(model: Any) -> None:
    mon = monitor(POLICIES["objects"])
    row = dict(zip(NAMES, model.test_X[0].tolist(), strict=True))
    del row["px3"]
    batch = feed_pb2.FeedBatch(policy="demo/digits-model")
    batch.queries.add(client_key="k", request_body=json.dumps({"instances": [row]}).encode())
    assert mon.report(batch) == 0
    assert mon.stats.unparsable == {"features": 1}


def test_kserve_tensors_that_do_not_fit_their_shape_are_junk(model: Any) -> None:
    mon = monitor(POLICIES["kserve"])
    batch = feed_pb2.FeedBatch(policy="demo/digits-model")
    for inputs in (
        [{"name": "a", "shape": [2, 64], "data": [1.0] * 127}],  # data short of the shape
        [{"name": "a", "shape": [1, 32], "data": [1.0] * 32},
         {"name": "b", "shape": [2, 16], "data": [1.0] * 32}],  # rows differ
        [{"name": "a", "shape": "1x64", "data": [1.0] * 64}],
        [{"name": "a", "shape": [10**12, 0], "data": []}],  # rows sized by data, not shape
    ):
        batch.queries.add(client_key="k", request_body=json.dumps({"inputs": inputs}).encode())
    assert mon.report(batch) == 0
    assert mon.stats.unparsable == {"features": 4}


def test_a_key_that_is_not_utf8_costs_only_its_own_query(model: Any) -> None:
    mon = monitor()
    X = model.test_X[:3]
    batch = feed_pb2.FeedBatch(policy="demo/digits-model")
    for i, row in enumerate(X):
        body = json.dumps({"instances": [row.tolist()]}).encode()
        if i == 1:
            batch.queries.add(client_key_raw=b"\xff\xfe-mallory", request_body=body)
        else:
            batch.queries.add(client_key="alice", request_body=body)
    batch.unobserved.add(client_key_raw=b"\xff\xfe", count=5, reason="buffer_full")
    # On the wire: what a sidecar sends decodes, whatever the key's bytes.
    decoded = feed_pb2.FeedBatch.FromString(batch.SerializeToString())
    assert mon.report(decoded) == 2
    assert mon.stats.unparsable["client_key"] == 6
    assert mon.client_count() == 1


def test_a_query_from_an_older_sidecar_decodes_the_same() -> None:
    # client_key stayed field 1, a string: the wire format of the keys that are UTF-8 is
    # unchanged, so sidecars and monitors of either version interoperate.
    query = feed_pb2.Query(client_key="alice", path="/v1/predict")
    assert query.SerializeToString().startswith(b"\x0a\x05alice")


def test_unobserved_answers_weigh_as_many_rows_as_they_returned() -> None:
    mon = monitor()
    gap = feed_pb2.FeedBatch(policy="demo/digits-model")
    # 2 requests of 256 rows each: as much evidence as 512 requests of one row.
    gap.unobserved.add(client_key="flooder", count=2, instances=512, reason="call_failed")
    mon.report(gap)
    assert [(v.stage, v.evidence[0].detector) for v in mon.sink.verdicts] == [  # type: ignore[attr-defined]
        ("suspicion", "unobserved")
    ]


def test_policy_fields_are_validated_with_their_paths() -> None:
    bad = with_fields(
        '{format: kserveV2, features: "$.inputs[*]", featureNames: [a], maxBytes: 99999999, '
        "maxInstances: 0}",
        '{scores: "$.outputs[0]", format: csv}',
    )
    _, violations = parse_documents(bad, "test")
    paths = {v.path for v in violations}
    for want in (
        "spec.request.maxBytes",
        "spec.request.maxInstances",
        "spec.response.format",
    ):
        assert want in paths, (want, violations)
    dup = with_fields('{features: "$.instances[*]", featureNames: [a, b, a]}', '{scores: "$.x"}')
    _, violations = parse_documents(dup, "test")
    assert [v.path for v in violations] == ["spec.request.featureNames[2]"]
    wrong = with_fields(
        '{format: kserveV2, features: "$.inputs[*]", featureNames: [a]}', '{scores: "$.x"}'
    )
    _, violations = parse_documents(wrong, "test")
    assert [v.path for v in violations] == ["spec.request.featureNames"]
