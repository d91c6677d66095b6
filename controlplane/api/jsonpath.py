"""The small JSONPath subset policies use to point into request and response bodies.

Supported: ``$``, ``.name``, ``['name']``, ``[n]`` (negative counts from the end) and the
wildcard ``[*]`` / ``.*``. ``$.instances[*]`` selects every instance of a request;
``$.predictions[*].probabilities`` the score vector of every prediction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_STEP = re.compile(
    r"\.(?P<name>[A-Za-z_][A-Za-z0-9_-]*)"
    r"|\.(?P<dotstar>\*)"
    r"|\[(?P<index>-?\d+)\]"
    r"|\[(?P<star>\*)\]"
    r"|\['(?P<quoted>[^']*)'\]"
    r'|\["(?P<dquoted>[^"]*)"\]'
)

Step = str | int | None  # a key, an index, or None for the wildcard


class JsonPathError(ValueError):
    pass


@dataclass(frozen=True)
class JsonPath:
    text: str
    steps: tuple[Step, ...]

    @classmethod
    def parse(cls, text: str) -> JsonPath:
        if not text.startswith("$"):
            raise JsonPathError(f"{text!r}: a JSONPath starts with '$'")
        steps: list[Step] = []
        pos = 1
        while pos < len(text):
            match = _STEP.match(text, pos)
            if match is None:
                raise JsonPathError(f"{text!r}: unsupported syntax at position {pos}")
            if match["name"] is not None:
                steps.append(match["name"])
            elif match["index"] is not None:
                steps.append(int(match["index"]))
            elif match["quoted"] is not None:
                steps.append(match["quoted"])
            elif match["dquoted"] is not None:
                steps.append(match["dquoted"])
            else:
                steps.append(None)
            pos = match.end()
        return cls(text, tuple(steps))

    def find(self, document: Any) -> list[Any]:
        """Every value the path selects, in document order (missing parts select nothing)."""
        current = [document]
        for step in self.steps:
            following: list[Any] = []
            for value in current:
                if step is None:
                    if isinstance(value, list):
                        following.extend(value)
                    elif isinstance(value, dict):
                        following.extend(value.values())
                elif isinstance(step, int):
                    if isinstance(value, list) and -len(value) <= step < len(value):
                        following.append(value[step])
                elif isinstance(value, dict) and step in value:
                    following.append(value[step])
            current = following
        return current
