"""A model that answers labels only (``spec.response.label``, no scores): the monitor takes
each row's class from the label, numbered as the reference's label column numbers it (class
numbers as they are, class names by their sorted index), so PRADA and the extraction-risk
estimate see the model's classes; scores win where both are readable; an unreadable label
costs only the class, and is counted (``label``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from monitor_policy import POLICY, digits_profile, policies
from test_held_out_round2 import check

from bench.extraction.models import (
    calibrated_monitor,
    drive,
    reference_csv,
    uniform_box,
    wine_model,
)
from controlplane.api import parse_documents
from controlplane.api.reference import load_file
from controlplane.extraction.calibrate import Profile
from controlplane.extraction.held_out import round2_clients
from controlplane.extraction.monitor import MAX_NEW_LABELS, NEW_LABELS, ExtractionMonitor
from controlplane.extraction.verdicts import ClientRef, InMemoryVerdictSink, VerdictStore
from controlplane.gen.modelguard.feed.v1 import feed_pb2
from controlplane.local.model import load_model
from controlplane.local.model import reference_csv as digits_reference_csv
from controlplane.policies.extraction.compile import compile_one
from controlplane.policies.extraction.translate import filter_config

SCORES = 'response: {scores: "$.predictions[*].probabilities"}'
# Digits named in words: their sorted order (eight, five, four, ...) is not the digits'.
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="module")
def model() -> Any:
    return load_model(0)


def label_policy(response: str) -> str:
    assert SCORES in POLICY
    return POLICY.replace(SCORES, f"response: {response}")


def monitor(response: str, profile: Profile | None = None) -> ExtractionMonitor:
    loaded = policies(label_policy(response))
    chosen = profile or digits_profile()
    return ExtractionMonitor(
        lambda: loaded, VerdictStore(), InMemoryVerdictSink(), profile=lambda _: chosen
    )


def batch_of(X: np.ndarray, answers: list[Any]) -> feed_pb2.FeedBatch:
    """One query per (row, answer body) pair, all from client "k"."""
    batch = feed_pb2.FeedBatch(policy="demo/digits-model")
    for row, answer in zip(X, answers, strict=True):
        batch.queries.add(
            client_key="k",
            request_body=json.dumps({"instances": [row.tolist()]}).encode(),
            response_body=json.dumps(answer).encode(),
        )
    return batch


def classes(mon: ExtractionMonitor, batch: feed_pb2.FeedBatch) -> list[int]:
    """The classes the monitor reads for client "k"'s rows (-1: none)."""
    policy = mon.watched("demo/digits-model")
    assert policy is not None
    profile = mon._profile(policy)
    assert profile is not None
    _, clients = mon._read(policy, 64, batch.queries, profile.classes)
    return clients["k"].labels


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ('{label: "$.predictions[*]"}', lambda y: {"predictions": [y]}),
        ('{label: "$.predictions[*].label"}', lambda y: {"predictions": [{"label": y}]}),
        ('{label: "$.labels"}', lambda y: {"labels": [y]}),  # the array itself
        ('{label: "$.predictions[*]"}', lambda y: {"predictions": [[y]]}),  # (n, 1) output
        ('{label: "$.predictions[*]"}', lambda y: {"predictions": [float(y)]}),
        ('{label: "$.predictions[*]"}', lambda y: {"predictions": [str(y)]}),
        (
            '{format: kserveV2, label: "$.outputs[0]"}',
            lambda y: {"outputs": [{"name": "label", "shape": [1], "datatype": "INT64",
                                    "data": [y]}]},
        ),
    ],
)
def test_class_numbers_answered_are_the_rows_classes(
    model: Any, response: str, answer: Any
) -> None:
    mon = monitor(response)
    X = model.test_X[:30]
    y = model.predict(X).tolist()
    assert len(set(y)) >= 5
    assert classes(mon, batch_of(X, [answer(c) for c in y])) == y
    assert not mon.stats.unparsable


def test_class_names_are_numbered_as_the_references_label_column(
    model: Any, tmp_path: Path
) -> None:
    # A reference whose label column holds names: read as the control plane reads it.
    text = digits_reference_csv(model)
    lines = text.splitlines()
    named = [lines[0]] + [
        line.rsplit(",", 1)[0] + "," + WORDS[int(line.rsplit(",", 1)[1])] for line in lines[1:]
    ]
    (tmp_path / "named.csv").write_text("\n".join(named) + "\n")
    data = load_file(tmp_path / "named.csv", "label")
    assert data.classes == tuple(sorted(WORDS)) and data.answers is not None
    profile = dataclasses.replace(digits_profile(), classes=data.classes)
    mon = monitor('{label: "$.predictions[*].label"}', profile)
    X = model.train_X[:40]
    words = [WORDS[c] for c in model.predict(X)]
    got = classes(mon, batch_of(X, [{"predictions": [{"label": w}]} for w in words]))
    # The class a name answered gets is the one the reference's held-out answers hold for it.
    assert got == data.answers[:40].astype(int).tolist()
    assert got != model.predict(X).tolist()  # by name, not by the digit it spells
    # kserveV2: a BYTES tensor of names.
    mon = monitor('{format: kserveV2, label: "$.outputs[0]"}', profile)
    body = {"outputs": [{"name": "label", "shape": [1, 1], "datatype": "BYTES",
                         "data": words[:1]}]}
    assert classes(mon, batch_of(X[:1], [body])) == got[:1]
    assert not mon.stats.unparsable


def test_scores_win_over_labels_when_both_are_readable(model: Any) -> None:
    mon = monitor('{scores: "$.predictions[*].probabilities", label: "$.predictions[*].label"}')
    X = model.test_X[:3]
    answers = [
        {"predictions": [{"probabilities": np.eye(10)[4].tolist(), "label": 7}]},  # scores: 4
        {"predictions": [{"probabilities": "n/a", "label": 7}]},  # unreadable scores: the label
        {"predictions": [{"label": 2}]},  # no scores: the label
    ]
    assert classes(mon, batch_of(X, answers)) == [4, 7, 2]
    assert mon.stats.unparsable == {"scores": 2}


def test_unreadable_labels_cost_the_class_and_are_counted(model: Any) -> None:
    mon = monitor('{label: "$.predictions[*]"}')
    bad: list[Any] = [3.5, None, [1, 2], {"c": 1}, -1, NEW_LABELS, 10**30, ""]
    X = model.test_X[: len(bad) + 3]
    answers = [{"predictions": [v]} for v in bad] + [
        {"predictions": []},  # no label for the row
        {"predictions": [1, 2]},  # two labels for one row
        {"other": 1},  # nothing at the path
    ]
    assert mon.report(batch_of(X, answers)) == len(X)  # still watched
    assert mon.stats.unparsable == {"label": len(X)}
    (tracked,) = mon._clients.values()
    assert set(tracked.state.labels[: tracked.state.stored].tolist()) == {-1}


def test_names_the_reference_never_had_are_classes_of_their_own_in_bounded_memory(
    model: Any,
) -> None:
    profile = dataclasses.replace(digits_profile(), classes=tuple(sorted(WORDS)))
    mon = monitor('{label: "$.predictions[*]"}', profile)
    n = MAX_NEW_LABELS + 20
    X = np.random.default_rng(0).uniform(0, 16, (n + 2, 64)).round(1)
    names = ["eleven", "twelve", "eleven"] + [f"new-{i}" for i in range(n - 1)]
    got = classes(mon, batch_of(X, [{"predictions": [name]} for name in names]))
    assert got[:3] == [NEW_LABELS, NEW_LABELS + 1, NEW_LABELS]  # a new name keeps its class
    assert got[3] == NEW_LABELS + 2 and len(got) == len(names)
    # Past the table's bound a new name is unreadable; known names still read.
    assert mon.stats.unparsable == {"label": len(set(names)) - MAX_NEW_LABELS}
    assert len(mon._labels["demo/digits-model"]._new) == MAX_NEW_LABELS
    assert classes(mon, batch_of(X[:2], [{"predictions": ["nine"]}, {"predictions": ["eleven"]}])
                   ) == [sorted(WORDS).index("nine"), NEW_LABELS]


def test_a_label_only_policy_is_valid_compiles_and_feeds_the_monitor() -> None:
    (policy,) = policies(label_policy('{label: "$.predictions[*].label"}'))
    ir = compile_one(policy)
    assert ir.scores is None and ir.label == "$.predictions[*].label" and ir.feed is not None
    config = filter_config(ir, "n")
    # The feed ships every answered request with its response body; nothing is hardened.
    assert "feed" in config and "output" not in config and config["scores"] == []
    for response, path, message in (
        ("{format: json}", "spec.response", "must set at least one of scores, label"),
        ('{label: "$.label"}\n  output: {topK: 1}', "spec.output",
         "hardens the model's scores: set spec.response.scores, or remove it (a model that "
         "answers labels only has nothing to harden)"),
    ):
        _, violations = parse_documents(label_policy(response), "test")
        assert [(v.path, v.message) for v in violations] == [(path, message)]


# --- behaviour: a real model answering labels only ------------------------------------------

LABEL_ONLY = '{label: "$.predictions[*].label"}'


def test_a_label_only_model_is_defended_as_one_with_scores(tmp_path: Path) -> None:
    """The wine model (scikit-learn's bundled data) answering its class names only, behind
    a policy with a reference whose label column holds those names: uniform noise is still
    quarantined, the held-out benign users are not, and a natural in-distribution learner
    gets an extraction-risk estimate (none without labels)."""
    from sklearn.datasets import load_wine

    model = wine_model(0)
    names = [str(n) for n in load_wine().target_names]
    reference = tmp_path / "reference.csv"
    reference.write_text(reference_csv(model.train_X, model.predict(model.train_X), names))
    mon = calibrated_monitor(reference, tmp_path / "profiles", LABEL_ONLY)

    def named(p: np.ndarray) -> dict[str, Any]:
        return {"label": names[int(p.argmax())]}

    rng = np.random.default_rng(2028)
    pool = np.asarray(model.test_X, dtype=np.float32)
    streams = list(round2_clients(rng, pool, 1, lambda X: np.asarray(model.predict(X))))
    lo, hi = model.train_X.min(axis=0), model.train_X.max(axis=0)
    streams += [(f"attack-uniform-{i}", uniform_box(rng, lo, hi, 600)) for i in range(3)]
    learner = ("learner", pool[rng.permutation(len(pool))])
    outcomes = drive(mon, "demo/m", model.predict_proba, [*streams, learner], answer=named)
    check("wine", outcomes)
    assert not mon.stats.unparsable  # every name read
    shown = ClientRef.of("demo/m", "learner", "header", "x-api-key").shown
    risks = {client: f for _, client, f, _ in mon.risks()}
    # Well above what a constant copy (the most common answer) agrees on: ~0.4 on wine.
    profile = mon._profile(mon.watched("demo/m"))
    answers = np.asarray(profile.held_out_answers)
    constant = np.bincount(answers.astype(int)).max() / len(answers)
    assert risks[shown] > constant + 0.2, (risks[shown], constant)

    # The same learner answered without labels: nothing to learn from, no estimate.
    bare = calibrated_monitor(reference, tmp_path / "profiles", LABEL_ONLY)
    drive(bare, "demo/m", model.predict_proba, [learner], answer=lambda p: {})
    assert bare.stats.unparsable == {"label": len(pool)}
    assert [r for r in bare.risks() if r[1] == shown] == []
