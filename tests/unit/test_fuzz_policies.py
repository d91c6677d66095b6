"""Property-based fuzzing of policy parsing: any input gets violations or policies, never an
exception, and every violation names where it is."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.api import parse_documents

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(
                [
                    "spec",
                    "targetRef",
                    "service",
                    "rules",
                    "action",
                    "from",
                    "to",
                    "limits",
                    "name",
                    "per",
                    "requests",
                    "clientKey",
                    "header",
                    "x",
                    "mode",
                    "allow",
                ]
            )
            | st.text(max_size=6),
            inner,
            max_size=5,
        ),
    ),
    max_leaves=20,
)
kinds = st.sampled_from(["AccessPolicy", "EgressPolicy", "RatePolicy", "ExtractionPolicy", "Pod"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=kinds, spec=values, name=st.text(max_size=20))
def test_any_policy_shaped_document_is_parsed_or_rejected_with_paths(
    kind: str, spec: object, name: str
) -> None:
    doc = {
        "apiVersion": "modelguard.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "demo"},
        "spec": spec,
    }
    loaded, violations = parse_documents(yaml.safe_dump(doc), "fuzz.yaml")
    assert len(loaded) + (1 if violations else 0) == 1
    for violation in violations:
        text = str(violation)
        assert text.startswith("fuzz.yaml[0]")
        assert violation.message


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_never_raises(text: str) -> None:
    loaded, violations = parse_documents(text, "junk.yaml")
    for violation in violations:
        assert str(violation).startswith("junk.yaml")
    for policy in loaded:  # text that happens to be a valid policy keeps where it came from
        assert policy.source == "junk.yaml"
