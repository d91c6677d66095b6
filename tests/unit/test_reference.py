"""spec.detection.reference: formats read, every violation reported at its field path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from controlplane.api import parse_documents, reference
from controlplane.api.reference import ReferenceError, load_file, parse

POLICY = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {{name: m, namespace: demo}}
spec:
  targetRef: {{service: m}}
  clientKey: {{header: x-api-key}}
  request: {{features: "$.instances[*]"}}
  response: {{scores: "$.predictions[*].probabilities"}}
  detection: {detection}
"""
HEAD = "ExtractionPolicy demo/m: "


def rows(n: int = 120, d: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).round(3)


def violations(tmp_path: Path, detection: str) -> list[str]:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.format(detection=detection))
    _, found = parse_documents(path.read_text(), str(path))
    return [str(v).split(HEAD, 1)[-1] for v in found]


def test_csv_with_and_without_header_jsonl_and_npy_read_the_same(tmp_path: Path) -> None:
    X = rows()
    labels = (X[:, 0] > 0).astype(int)
    (tmp_path / "plain.csv").write_text("\n".join(",".join(map(str, r)) for r in X) + "\n")
    header = "a,b,c,d,label\n" + "\n".join(
        ",".join([*map(str, r), str(y)]) for r, y in zip(X, labels, strict=True)
    )
    (tmp_path / "header.csv").write_text(header)
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps([*r.tolist(), int(y)])
                                                   for r, y in zip(X, labels, strict=True)))
    np.save(tmp_path / "rows.npy", np.column_stack([labels, X]))
    plain = load_file(tmp_path / "plain.csv")
    assert plain.X.shape == (120, 4) and plain.X.dtype == np.float32 and plain.answers is None
    for name, column in (("header.csv", "label"), ("header.csv", -1), ("rows.jsonl", 4),
                         ("rows.npy", 0)):
        data = load_file(tmp_path / name, column)
        np.testing.assert_allclose(data.X, X, rtol=1e-6)
        assert data.answers is not None and data.answers.tolist() == labels.tolist(), name
    # The digest is of the bytes: the cache key of a calibration.
    assert load_file(tmp_path / "plain.csv").digest == plain.digest != data.digest


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1,2\n" * 50, "has 50 rows; at least 100"),
        ("1,2\n" * 99 + "1,2,3\n", "row 100 has 3 values, the first row 2"),
        ("1,2\n" * 99 + "1,x\n", "row 100, column 1: 'x' is not a number"),
        ("1,2\n" * 99 + "1,nan\n", "row 100, column 1: not a finite number"),
        ("", "is empty"),
        ("[1, 2]\n" * 99 + "[1, true]\n", "row 100, column 1: True is not a number"),
        ("[1, 2]\n" * 99 + "{\"a\": 1}\n", "line 100: must be a JSON array of numbers"),
        ("[1, 2]\n" * 99 + "[1, 2\n", "line 100: not JSON"),
        ("1e39,1\n" * 100, "beyond float32 range"),
    ],
)
def test_bad_reference_files_are_refused_at_their_field_path(
    tmp_path: Path, content: str, message: str
) -> None:
    name = "ref.jsonl" if content.startswith("[") else "ref.csv"
    (tmp_path / name).write_text(content)
    (found,) = violations(tmp_path, f"{{reference: {{file: {name}}}}}")
    assert found.startswith("spec.detection.reference.file: "), found
    assert message in found


def test_limits_missing_files_and_label_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ref.csv").write_text("a,b\n" + "1,2\n" * 150)
    assert violations(tmp_path, "{reference: {file: ref.csv}}") == []  # relative to the policy
    (found,) = violations(tmp_path, "{reference: {file: nowhere.csv}}")
    assert found.startswith("spec.detection.reference.file: cannot read ")
    (found,) = violations(tmp_path, "{reference: {file: ref.csv, labelColumn: c}}")
    assert found.startswith("spec.detection.reference.labelColumn: no column 'c'")
    (found,) = violations(tmp_path, "{reference: {file: ref.csv, labelColumn: 5}}")
    assert found == ("spec.detection.reference.labelColumn: column 5 is out of range for rows "
                     "of 2 values")
    assert violations(tmp_path, "{reference: {file: ref.csv, labelColumn: 0}}") == []
    monkeypatch.setattr(reference, "MAX_ROWS", 120)
    (found,) = violations(tmp_path, "{reference: {file: ref.csv}}")
    assert found == "spec.detection.reference.file: has 150 rows; at most 120"
    monkeypatch.setattr(reference, "MAX_BYTES", 100)
    (found,) = violations(tmp_path, "{reference: {file: ref.csv}}")
    assert found.startswith("spec.detection.reference.file: ") and "at most 100" in found


def test_npy_must_be_a_numeric_matrix_never_a_pickle(tmp_path: Path) -> None:
    np.save(tmp_path / "cube.npy", np.zeros((120, 2, 2)))
    (found,) = violations(tmp_path, "{reference: {file: cube.npy}}")
    assert found == "spec.detection.reference.file: must be a 2-D array (rows × columns), not 3-D"
    np.save(tmp_path / "objects.npy", np.array([[{"a": 1}]] * 120, dtype=object),
            allow_pickle=True)
    (found,) = violations(tmp_path, "{reference: {file: objects.npy}}")
    assert found.startswith("spec.detection.reference.file: is not a readable .npy array")


def test_reference_detectors_need_reference_data(tmp_path: Path) -> None:
    found = violations(tmp_path, "{detectors: [prada, coverage, outOfDistribution]}")
    assert found == [
        "spec.detection.detectors[1]: coverage compares queries with the model's own data: "
        "set spec.detection.reference (file or configMap) or remove it"
    ]
    assert violations(tmp_path, "{detectors: [prada, nearDuplicate]}") == []
    assert violations(tmp_path, "{sensitivity: high}") == []  # defaults to the two
    found = violations(tmp_path, "{reference: {file: a.csv, configMap: {name: r, key: k}}}")
    assert found == ["spec.detection.reference: exactly one of file, configMap must be set"]
    found = violations(tmp_path, "{reference: {configMap: {name: Bad_Name, key: k}}}")
    assert found[0].startswith("spec.detection.reference.configMap.name: must be")


def test_parse_reads_configmap_bytes_and_names_its_own_path() -> None:
    data = parse(b"1,2\n" * 100, "ref.csv", loc=("configMap",))
    assert data.X.shape == (100, 2)
    with pytest.raises(ReferenceError) as err:
        parse(b"1,2\n" * 10, "ref.csv", loc=("configMap",))
    assert err.value.loc == ("configMap",)


def test_a_label_column_of_class_names_is_numbered_in_sorted_order(tmp_path: Path) -> None:
    """Names (``setosa``) rather than numbers: each row's answer is its name's index among
    the sorted names, as scikit-learn numbers a classifier's ``classes_``."""
    X = rows()
    kinds = ["virginica", "setosa", "versicolor"]
    names = [kinds[i % 3] for i in range(len(X))]
    want = [sorted(kinds).index(n) for n in names]
    body = [",".join([*map(str, r), n]) for r, n in zip(X, names, strict=True)]
    (tmp_path / "header.csv").write_text("a,b,c,d,species\n" + "\n".join(body) + "\n")
    (tmp_path / "plain.csv").write_text("\n".join(body) + "\n")  # first row: data, not header
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps([n, *r.tolist()])
                                                   for r, n in zip(X, names, strict=True)))
    for name, column in (("header.csv", "species"), ("plain.csv", -1), ("plain.csv", 4),
                         ("rows.jsonl", 0)):
        data = load_file(tmp_path / name, column)
        assert data.classes == ("setosa", "versicolor", "virginica"), name
        assert data.answers is not None and data.answers.tolist() == want, name
        np.testing.assert_allclose(data.X, X, rtol=1e-6)
    # Names elsewhere than the label column are still not numbers.
    (found,) = violations(tmp_path, "{reference: {file: header.csv}}")
    assert found.startswith("spec.detection.reference.file: row 1, column 4: 'virginica' is not")
    (tmp_path / "bad.jsonl").write_text("\n".join(
        json.dumps([*r.tolist(), n if i != 7 else None]) for i, (r, n) in
        enumerate(zip(X, names, strict=True))))
    (found,) = violations(tmp_path, "{reference: {file: bad.jsonl, labelColumn: 4}}")
    assert found == ("spec.detection.reference.labelColumn: row 8: None is neither a number "
                     "nor a class name")
