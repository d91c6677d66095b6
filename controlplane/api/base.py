"""What every policy kind shares: the model base, object metadata and name rules.

Models are pydantic v2, frozen, and strict: YAML already carries types, so ``"20"`` where
an integer belongs is a mistake to report, not a value to coerce. YAML keys are camelCase
(``targetRef``), Python attributes snake_case (``target_ref``).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

API_VERSION: Final = "modelguard.io/v1alpha1"

Loc = tuple[str | int, ...]


class FieldError(ValueError):
    """A validator's error about a field below the model that raised it.

    A model validator can only fail the whole model; ``loc`` (relative to that model, in
    YAML names) lets the violation point at the field a user must change instead.
    """

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc


def custom_error(loc: Loc, message: str, value: Any = None) -> InitErrorDetails:
    # The message travels as context, so braces in user input never reach a format string.
    return InitErrorDetails(
        type=PydanticCustomError("modelguard", "{message}", {"message": message}),
        loc=loc,
        input=value,
    )


def _again(error: ErrorDetails) -> InitErrorDetails:
    """An error caught from a nested validation, ready to be raised again."""
    if error["type"] == "modelguard":
        return custom_error(error["loc"], error["msg"], error["input"])
    again = InitErrorDetails(type=error["type"], loc=error["loc"], input=error["input"])
    if "ctx" in error:
        again["ctx"] = error["ctx"]
    return again


def _merge(errors: list[InitErrorDetails], found: list[InitErrorDetails]) -> list[InitErrorDetails]:
    """Place each precheck error (on ``(list, i, ...)``) among the field errors in document
    order: after those of items up to ``i``, before those of later items."""
    merged = list(errors)
    for extra in found:
        field, index = extra["loc"][0], extra["loc"][1]
        for i, error in enumerate(merged):
            loc = error["loc"]
            later = len(loc) > 1 and isinstance(loc[1], int) and isinstance(index, int)
            if later and loc[0] == field and int(loc[1]) > int(index):
                position = i
                break
        else:
            last = [i for i, error in enumerate(merged) if error["loc"][:1] == (field,)]
            position = last[-1] + 1 if last else len(merged)
        merged.insert(position, extra)
    return merged


class Model(BaseModel):
    """Base of every API model.

    ``precheck`` is for rules across list items (unique names). It sees the raw input, so
    those violations are reported together with every field error, not only once the rest
    of the object is valid.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        strict=True,
    )

    @classmethod
    def precheck(cls, data: dict[str, Any]) -> list[InitErrorDetails]:
        return []

    @model_validator(mode="wrap")
    @classmethod
    def _run_precheck(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        found = cls.precheck(data) if isinstance(data, dict) else []
        try:
            model = handler(data)
        except ValidationError as err:
            if not found:
                raise
            details = _merge([_again(e) for e in err.errors()], found)
            raise ValidationError.from_exception_data(err.title, details) from None
        if found:
            raise ValidationError.from_exception_data(cls.__name__, found)
        return model


def duplicate_names(
    data: dict[str, Any], list_field: str, key: str, attr: str | None = None
) -> list[InitErrorDetails]:
    """Errors on the later items of ``data[list_field]`` that repeat an earlier ``key``.

    Items may be raw mappings (YAML) or already-built models (Python callers).
    """
    items = data.get(list_field)
    if not isinstance(items, list):
        return []
    first: dict[str, int] = {}
    errors = []
    for i, item in enumerate(items):
        name = item.get(key) if isinstance(item, dict) else getattr(item, attr or key, None)
        if not isinstance(name, str):
            continue
        if name in first:
            errors.append(
                custom_error(
                    (list_field, i, key),
                    f'duplicate name "{name}" (first used by {list_field}[{first[name]}])',
                    name,
                )
            )
        else:
            first[name] = i
    return errors


def exactly_one(fields: dict[str, object]) -> None:
    """Raise unless exactly one of ``fields`` (YAML name → value) is set."""
    chosen = [name for name, value in fields.items() if value not in (None, False)]
    if len(chosen) != 1:
        raise ValueError(f"exactly one of {', '.join(fields)} must be set")


def at_least_one(fields: dict[str, object]) -> None:
    if not any(value not in (None, False, [], {}) for value in fields.values()):
        raise ValueError(f"must set at least one of {', '.join(fields)}")


# --- names ---------------------------------------------------------------------------

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL.pattern}(\.{_DNS_LABEL.pattern})*")


def _dns_label(value: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.fullmatch(value):
        raise ValueError(
            "must be a DNS-1123 label: lowercase letters, digits and '-', at most 63 characters"
        )
    return value


def _dns_subdomain(value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
        raise ValueError(
            "must be a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', "
            "at most 253 characters"
        )
    return value


def _pattern(regex: re.Pattern[str]) -> dict[str, Any]:
    return {"pattern": f"^{regex.pattern}$"}


DnsLabel = Annotated[
    str,
    AfterValidator(_dns_label),
    Field(max_length=63, json_schema_extra=_pattern(_DNS_LABEL)),
]
DnsSubdomain = Annotated[
    str,
    AfterValidator(_dns_subdomain),
    Field(max_length=253, json_schema_extra=_pattern(_DNS_SUBDOMAIN)),
]


def _timestamp(value: object) -> object:
    # YAML turns an unquoted RFC 3339 time into a datetime; the API server sends a string.
    return value.isoformat().replace("+00:00", "Z") if isinstance(value, datetime) else value


Timestamp = Annotated[str, BeforeValidator(_timestamp)]


# --- metadata and the policy envelope ---------------------------------------------------


class Metadata(Model):
    """Kubernetes ObjectMeta: the fields policies use, plus the ones the API server adds
    (accepted so objects read back from a cluster validate unchanged)."""

    name: DnsSubdomain
    namespace: DnsLabel = "default"
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    generation: int = Field(default=1, ge=1)
    uid: str | None = None
    resource_version: str | None = None
    generate_name: str | None = None
    creation_timestamp: Timestamp | None = None
    deletion_timestamp: Timestamp | None = None
    deletion_grace_period_seconds: int | None = None
    finalizers: list[str] = []
    owner_references: list[dict[str, Any]] = []
    managed_fields: list[dict[str, Any]] = []
    self_link: str | None = None


class PolicyBase(Model):
    """The envelope every kind shares. Subclasses narrow ``kind`` and define ``spec``."""

    KIND: ClassVar[str]
    # The spec's list field that grows with a policy's size (bounded by api/limits.py).
    RULE_LIST: ClassVar[str | None] = None

    api_version: Literal["modelguard.io/v1alpha1"] = API_VERSION
    metadata: Metadata

    @model_validator(mode="before")
    @classmethod
    def _drop_status(cls, data: Any) -> Any:
        # Objects read from a cluster carry status; it is ours to write, never an input.
        if isinstance(data, dict) and "status" in data:
            return {k: v for k, v in data.items() if k != "status"}
        return data

    @property
    def ref(self) -> tuple[str, str, str]:
        """``(kind, namespace, name)``: the identity of a policy across sources."""
        return (self.KIND, self.metadata.namespace, self.metadata.name)
