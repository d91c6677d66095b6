"""An extension of kmock's Kubernetes emulator (a fake of ours, not kmock's behaviour):
label selectors and paginated lists, which kmock 0.8 ignores.

kmock answers a list with every object of the resource, whatever ``labelSelector``,
``limit`` and ``continue`` say, and streams every event to every watch. The real API
server filters by the selector and pages a list when ``limit`` is given (``continue`` in
the list's metadata until the last page). This subclass does the same, for equality-based
selectors (``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, comma-separated: what this project
uses). Use it with ``@pytest.mark.kmock(cls=PagingKubernetesEmulator)``.

It records, per resource path, the ``limit``, ``continue`` and ``labelSelector`` of every
list it served (``lists``), so a test can tell that a client followed the pages to the end.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import kmock
from kmock._internal import rendering


def selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = (x.strip() for x in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (x.strip() for x in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


class PagingKubernetesEmulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    """kmock's emulator with label selectors and ``limit``/``continue`` on lists."""

    lists: list[dict[str, Any]]

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.lists = []

    async def _serve_list(self, request: rendering.Request) -> Any:
        listing = await super()._serve_list(request)
        params = request.params
        selector = params.get("labelSelector") or ""
        self.lists.append(
            {
                "path": request.url.path,
                "limit": params.get("limit"),
                "continue": params.get("continue"),
                "labelSelector": selector or None,
            }
        )
        # A stable order, as the API server's (by key), so that pages do not overlap.
        items = sorted(
            (i for i in listing["items"] if selector_matches(selector, _labels(i))), key=_key
        )
        token = params.get("continue")
        if token:
            after = tuple(json.loads(base64.urlsafe_b64decode(token.encode())))
            items = [i for i in items if _key(i) > after]
        limit = int(params.get("limit") or 0)
        meta: dict[str, Any] = {"resourceVersion": "1"}
        if limit and len(items) > limit:
            items = items[:limit]
            meta["continue"] = base64.urlsafe_b64encode(
                json.dumps(list(_key(items[-1]))).encode()
            ).decode()
        return {"metadata": meta, "items": items}

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        selector = request.params.get("labelSelector") or ""
        async for event in super()._serve_watch(request):
            if not isinstance(event, dict) or not selector:
                yield event
                continue
            obj = event.get("object") or {}
            if selector_matches(selector, _labels(obj)):
                yield event
            elif event.get("type") == "MODIFIED":
                # As the API server: an object that stops matching leaves the watch.
                yield {"type": "DELETED", "object": obj}
