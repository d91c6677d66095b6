"""A policy's reference data (``spec.detection.reference``): rows like the model's own
traffic, read and checked.

Formats, by content and suffix:

- ``.npy``: a 2-D numeric array (a NumPy file, never a pickle);
- JSON Lines (``.jsonl``, ``.ndjson``, or any text whose first non-blank line starts with
  ``[``): one JSON array of numbers per line;
- CSV (anything else): comma-separated numbers, with an optional header row (a first row
  that is not all numbers is a header).

``labelColumn`` names a column holding the MODEL'S OWN answer on that row (its predicted
class, or its score for single-score models); that column is not a feature. A CSV header
name, or an integer index (negative counts from the end). In CSV and JSON Lines the
column may hold class names (``setosa``) instead of numbers: the classes are then the
names in sorted order, numbered from 0 (``ReferenceData.classes``), which is the order
scikit-learn gives a classifier's ``classes_``, and so its scores' columns.

Every problem is a :class:`ReferenceError` whose ``loc`` is relative to
``spec.detection.reference`` (``("file",)``, ``("labelColumn",)``, ...), so a policy loader
can report it at its field path.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

MIN_ROWS = 100  # fewer rows than this cannot calibrate a per-client statistic
MAX_ROWS = 100_000  # memory and calibration time stay bounded
MAX_BYTES = 64 * 1024 * 1024
MAX_CLASS_NAMES = 1024  # distinct names in a label column of names

Loc = tuple[str | int, ...]


class ReferenceError(ValueError):
    """Reference data that cannot be used; ``loc`` is relative to ``detection.reference``."""

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc


@dataclass(frozen=True)
class ReferenceData:
    """Feature rows (float32, n × d) and, when the data carries them, the model's answers."""

    X: npt.NDArray[np.float32]
    answers: npt.NDArray[np.float64] | None = None
    digest: str = ""  # SHA-256 of the bytes it was read from (the calibration cache key)
    # A label column of names: the names, sorted; ``answers`` holds each row's index here.
    classes: tuple[str, ...] = ()

    @property
    def dim(self) -> int:
        return int(self.X.shape[1])


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _parse_csv(
    text: str, loc: Loc, label_column: str | int | None = None
) -> tuple[list[str] | None, list[list[str]]]:
    rows = [row for row in csv.reader(io.StringIO(text)) if row and any(c.strip() for c in row)]
    if not rows:
        raise ReferenceError(loc, "is empty: no rows")
    # A label column given by index may hold names: the first row is a header only if one
    # of its other cells is not a number.
    width = len(rows[0])
    names_at = (
        label_column % width
        if isinstance(label_column, int) and -width <= label_column < width
        else None
    )
    header = None
    if not all(_is_number(c) for j, c in enumerate(rows[0]) if j != names_at):
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    return header, rows


def _is_json_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _label_names(values: list[object]) -> list[str] | None:
    """A label column's values as class names, or None when they are all numbers."""
    if all(_is_number(v) if isinstance(v, str) else _is_json_number(v) for v in values):
        return None
    names = []
    for i, value in enumerate(values):
        if isinstance(value, str) and value.strip():
            names.append(value.strip())
        elif _is_json_number(value):
            names.append(json.dumps(value))  # a number among names: its JSON text
        else:
            raise ReferenceError(
                ("labelColumn",), f"row {i + 1}: {value!r} is neither a number nor a class name"
            )
    return names


def _parse_jsonl(text: str, loc: Loc) -> list[list[object]]:
    rows: list[list[object]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ReferenceError(loc, f"line {number}: not JSON ({err})") from None
        if not isinstance(row, list):
            raise ReferenceError(loc, f"line {number}: must be a JSON array of numbers")
        rows.append(row)
    return rows


def _column_index(label_column: str | int, header: list[str] | None, width: int) -> int:
    if isinstance(label_column, str):
        if header is None or label_column not in header:
            where = f"the header {header}" if header else "no header row"
            raise ReferenceError(("labelColumn",), f"no column {label_column!r}: {where}")
        return header.index(label_column)
    if not -width <= label_column < width:
        raise ReferenceError(
            ("labelColumn",), f"column {label_column} is out of range for rows of {width} values"
        )
    return label_column % width


def parse(
    data: bytes, name: str, label_column: str | int | None = None, loc: Loc = ("file",)
) -> ReferenceData:
    """Reference rows from a file's bytes (``name`` tells the format by its suffix)."""
    if len(data) > MAX_BYTES:
        raise ReferenceError(loc, f"is {len(data)} bytes; at most {MAX_BYTES} (64 MiB)")
    header: list[str] | None = None
    classes: tuple[str, ...] = ()
    lower = name.lower()
    if lower.endswith(".npy") or data[:6] == b"\x93NUMPY":
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ReferenceError(loc, f"is not a readable .npy array: {err}") from None
        if array.ndim != 2:
            raise ReferenceError(loc, f"must be a 2-D array (rows × columns), not {array.ndim}-D")
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise ReferenceError(loc, f"must be numeric, not {array.dtype}")
        matrix = np.asarray(array, dtype=np.float64)
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ReferenceError(loc, "is not UTF-8 text (CSV, JSON Lines) nor .npy") from None
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")
        if lower.endswith((".jsonl", ".ndjson")) or first.startswith("["):
            raw: list[list[object]] = _parse_jsonl(text, loc)
        else:
            header, raw_csv = _parse_csv(text, loc, label_column)
            raw = [list[object](row) for row in raw_csv]
        if not raw:
            raise ReferenceError(loc, "has no data rows")
        width = len(raw[0])
        for i, row in enumerate(raw):
            if len(row) != width:
                raise ReferenceError(
                    loc, f"row {i + 1} has {len(row)} values, the first row {width}: "
                    "rows must all have one dimension"
                )
        if label_column is not None:
            at = _column_index(label_column, header, width)
            names = _label_names([row[at] for row in raw])
            if names is not None:
                classes = tuple(sorted(set(names)))
                if len(classes) > MAX_CLASS_NAMES:
                    raise ReferenceError(
                        ("labelColumn",),
                        f"holds {len(classes)} distinct class names; at most {MAX_CLASS_NAMES}",
                    )
                index = {name: i for i, name in enumerate(classes)}
                for row, name in zip(raw, names, strict=True):
                    row[at] = index[name]
        matrix = np.empty((len(raw), width), dtype=np.float64)
        for i, row in enumerate(raw):
            for j, value in enumerate(row):
                # JSON booleans and strings are not numbers, even where numpy would read them.
                if isinstance(value, bool) or not isinstance(value, int | float | str):
                    raise ReferenceError(loc, f"row {i + 1}, column {j}: {value!r} is not a number")
                try:
                    matrix[i, j] = float(value)
                except ValueError:
                    raise ReferenceError(
                        loc, f"row {i + 1}, column {j}: {value!r} is not a number"
                    ) from None
    if not np.isfinite(matrix).all():
        i, j = (int(v) for v in np.argwhere(~np.isfinite(matrix))[0])
        raise ReferenceError(loc, f"row {i + 1}, column {j}: not a finite number")
    answers = None
    if label_column is not None:
        column = _column_index(label_column, header, matrix.shape[1])
        answers = matrix[:, column].copy()
        matrix = np.delete(matrix, column, axis=1)
    n, d = matrix.shape
    if d == 0:
        raise ReferenceError(loc, "has no feature columns")
    if n < MIN_ROWS:
        raise ReferenceError(loc, f"has {n} rows; at least {MIN_ROWS} are needed to calibrate")
    if n > MAX_ROWS:
        raise ReferenceError(loc, f"has {n} rows; at most {MAX_ROWS}")
    with np.errstate(over="ignore"):
        X = matrix.astype(np.float32)
    if not np.isfinite(X).all():
        raise ReferenceError(loc, "holds values beyond float32 range")
    return ReferenceData(X, answers, hashlib.sha256(data).hexdigest(), classes)


def load_file(path: str | Path, label_column: str | int | None = None) -> ReferenceData:
    """Reference rows from a file (``file:`` in a policy, already resolved to a path)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ReferenceError(("file",), f"{path} is {size} bytes; at most {MAX_BYTES}")
        data = path.read_bytes()
    except OSError as err:
        raise ReferenceError(("file",), f"cannot read {path}: {err.strerror or err}") from None
    return parse(data, path.name, label_column)
