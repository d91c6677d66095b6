"""The live page (``/ui``): what an operator asks first, on one screen.

Who is probing the models (clients ranked by the extraction monitor's stage and evidence),
what the defense did (quarantines and throttles, with a release button; recent denials and
blocked egress; requests by verdict over time) and whether every sidecar is in sync.

The state is built here as a few tables of display strings (``state``): the server renders
them into the first HTML (``html``), and the page's script renders the same JSON every
POLL_MS, so there is one renderer of the data, in Python, and nothing to build in Node.

Client keys may be secrets (a raw API-key header): the page names a client by its key only
when the key is known not to be one (a verified key id or tenant set by the sidecar, a
SPIFFE ID, a JWT claim, an address), and by its fingerprint otherwise; releasing works by
fingerprint, so no key ever reaches the browser.
"""

from __future__ import annotations

import asyncio
import html as htmllib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from controlplane.compile.inputs.verdicts import ClientRef
from controlplane.telemetry.records import Kind

if TYPE_CHECKING:
    from controlplane.app.admin import AdminService
    from controlplane.extraction.monitor import ExtractionMonitor
    from controlplane.extraction.verdicts import VerdictStore
    from controlplane.ratelimit.budgets import Budgets
    from controlplane.telemetry.service import TelemetryService
    from controlplane.telemetry.verdict_log import VerdictLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sources:
    """What the page reads, handed over by the app (never the control-plane object)."""

    admin: AdminService  # the status report `modelguard status` reads
    budgets: Budgets
    monitor: ExtractionMonitor
    verdicts: VerdictStore
    verdict_log: VerdictLog | None
    telemetry: TelemetryService
    # Whether a global limit's clients are secrets (raw header keys): as `usage` names them.
    secret_rate_client: Callable[[str, str], bool] = lambda policy, limit: True

POLL_MS = 2000
CLIENTS_SHOWN = 25
BUDGET_CLIENTS = 5  # per global limit
TOP_CHARTED = 5
DENIALS_SHOWN = 20
DENIAL_VERDICTS = ("denied", "rate_limited")
STAGE_RANK = {"detected": 2, "suspected": 1, "watching": 0}

Cell = str | dict[str, str]


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds else ""


def _ago(seconds: float, now: float) -> str:
    left = int(seconds - now)
    if left <= 0:
        return "now"
    if left >= 3600:
        return f"{left // 3600}h{left % 3600 // 60:02d}m"
    return f"{left // 60}m{left % 60:02d}s"


def _evidence(evidence: Any) -> str:
    return "; ".join(
        f"{e.detector} {e.statistic:.3g} ≥ {e.threshold:.3g} after {e.queries} queries"
        for e in evidence
    )


def _table(title: str, columns: list[str], rows: list[list[Cell]], empty: str) -> dict[str, Any]:
    return {"title": title, "columns": columns, "rows": rows, "empty": empty}


async def budget_use(plane: Sources) -> list[list[Cell]] | str:
    """The global limits' top clients now (what `modelguard usage` shows), named as there; a
    message when the budget backend cannot be read."""
    from controlplane.ratelimit.admin import shown
    from controlplane.ratelimit.backend import BackendError

    try:
        usage = await asyncio.wait_for(plane.budgets.usage("", BUDGET_CLIENTS), 2.0)
    except (BackendError, TimeoutError) as err:
        return f"budget backend unavailable: {err}"
    rows: list[list[Cell]] = []
    for limit in usage:
        rule = limit.rule
        secret = plane.secret_rate_client(rule.policy, rule.limit)
        for client in limit.clients:
            rows.append(
                [
                    rule.limit,
                    rule.policy,
                    shown(client.client, secret),
                    f"{client.used} / {rule.requests} per {rule.window}s",
                    {"t": "at/over limit", "cls": "bad"} if client.over else "ok",
                ]
            )
    return rows


def state(plane: Sources, budgets: list[list[Cell]] | str = "") -> dict[str, Any]:
    now = time.time()
    report = json_format.MessageToDict(plane.admin.report())
    sidecar_state = {s["nodeId"]: s.get("state", "") for s in report.get("sidecars", [])}
    sidecars: list[list[Cell]] = []
    egress: list[list[Cell]] = []
    for s in report.get("sidecars", []):
        nacks = [
            f"{r.get('type', '')}: {r.get('lastNackError', '')}"
            for r in s.get("resources", [])
            if r.get("lastNackError")
        ]
        synced = s.get("state") == "SYNCED"
        sidecars.append(
            [
                s["nodeId"],
                f"{s.get('namespace', '')}/{s.get('service', '')}",
                s.get("stream", ""),
                {"t": s.get("state", ""), "cls": "ok" if synced else "bad"},
                s.get("snapshotVersion", "")[:12],
                "; ".join(nacks),
            ]
        )
        for block in s.get("egressBlocked", []):
            egress.append(
                [
                    s["nodeId"],
                    block.get("destination", ""),
                    block.get("protocol", ""),
                    block.get("verdict", ""),
                    block.get("policy", ""),
                    str(block.get("count", 0)),
                    block.get("lastSeen", "")[11:19],
                ]
            )
    policies: list[list[Cell]] = []
    for p in report.get("policies", []):
        accepted = p.get("state", "").lower() == "accepted"
        targets = p.get("sidecars", [])
        programmed = (
            accepted and bool(targets) and all(sidecar_state.get(t) == "SYNCED" for t in targets)
        )
        conditions = [
            {"t": f"Accepted={accepted}", "cls": "ok" if accepted else "bad"},
            {"t": f"Programmed={programmed}", "cls": "ok" if programmed else "warn"},
        ]
        policies.append(
            [
                p.get("kind", ""),
                f"{p.get('namespace', '')}/{p.get('name', '')}",
                conditions[0],
                conditions[1],
                str(p.get("generation", "")),
                str(len(targets)),
                "; ".join(p.get("errors", []) + p.get("warnings", [])),
            ]
        )

    monitor = plane.monitor
    verdict_log = plane.verdict_log
    # Joined on the ClientRef's key: a header key's digest (never the key), else the value.
    latest: dict[tuple[str, str], Any] = {}
    for verdict in verdict_log.recent() if verdict_log is not None else []:
        latest[verdict.client.policy, verdict.client.key] = verdict
    active = plane.verdicts.active()
    enforced = {(e.client.policy, e.client.key): e for e in active}
    # The monitor's estimated extraction fidelity per client (issue 10), where it keeps one;
    # it names clients as admin answers do (ClientRef.shown).
    risks = getattr(monitor, "risks", None)
    fidelity = {(r[0], r[1]): r[2] for r in risks()} if risks is not None else {}
    ranked: list[tuple[int, float, float, int, str, str, int, ClientRef]] = []
    for policy, key, stage, queries, unobserved in monitor.clients():
        watched = monitor.watched(policy)  # its key source: how the client may be named
        if watched is None:
            continue
        ref = ClientRef.of(policy, key, watched.key_source, watched.key_header)
        verdict = latest.get((policy, ref.key))
        ratio = max(
            (e.statistic / e.threshold for e in verdict.evidence if e.threshold), default=0.0
        ) if verdict is not None else 0.0  # fmt: skip
        estimate = fidelity.get((policy, ref.shown))
        shown = f"{estimate:.0%}" if estimate is not None else ""
        # Stage first; then the estimate (how much of the model it may have copied), then
        # how far past its threshold its evidence is.
        risk = estimate if estimate is not None else 0.0
        rank = STAGE_RANK.get(stage, 0)
        ranked.append((rank, risk, ratio, queries, stage, shown, unobserved, ref))
    # A quarantined client is forgotten by the monitor only on release: keep it listed.
    tracked = {(r[7].policy, r[7].key) for r in ranked}
    for (policy, key), held in enforced.items():
        if (policy, key) not in tracked:
            ranked.append((2, 0.0, 0.0, 0, "detected", "", 0, held.client))
    ranked.sort(key=lambda r: (-r[0], -r[1], -r[2], -r[3]))
    # The leaders' numbers for the page's risk chart (it keeps their history while open).
    top = [
        {
            "client": r[7].shown,
            "stage": r[4],
            "queries": r[3],
            "fidelity": fidelity.get((r[7].policy, r[7].shown)) if risks is not None else None,
            "evidence": round(r[2], 4),
        }
        for r in ranked[:TOP_CHARTED]
    ]
    clients: list[list[Cell]] = []
    for position, (_s, _f, _r, queries, stage, shown, unobserved, ref) in enumerate(
        ranked[:CLIENTS_SHOWN], 1
    ):
        verdict = latest.get((ref.policy, ref.key))
        e = enforced.get((ref.policy, ref.key))
        clients.append(
            [
                str(position),
                ref.shown,
                ref.policy,
                {"t": stage, "cls": {"detected": "bad", "suspected": "warn"}.get(stage, "")},
                {"t": e.kind, "cls": "bad"} if e is not None else "",
                str(queries),
                str(unobserved),
                *([shown] if risks is not None else []),
                _evidence(verdict.evidence) if verdict is not None else "",
            ]
        )
    quarantines: list[list[Cell]] = []
    for e in sorted(active, key=lambda e: -e.since):
        name = e.client.shown
        quarantines.append(
            [
                {"t": e.kind, "cls": "bad" if e.kind == "quarantine" else "warn"},
                name,
                e.client.policy,
                e.reason,
                _clock(e.since),
                _ago(e.until, now),
                {"t": "release", "release": e.client.fingerprint, "name": name},
            ]
        )
    denials: list[list[Cell]] = []
    records = []
    store = plane.telemetry.store
    for verdict_name in DENIAL_VERDICTS:
        from controlplane.telemetry.store import Query

        records += store.query(Query(verdict=verdict_name, kind=Kind.LOG), DENIALS_SHOWN)
    for record in sorted(records, key=lambda r: -r.time_unix_nano)[:DENIALS_SHOWN]:
        denials.append(
            [
                _clock(record.time_unix_nano / 1e9),
                record.service,
                str(record.status or ""),
                {"t": record.verdict, "cls": "bad"},
                record.rule,
                record.client[:20],
                record.route,
            ]
        )
    stats, tracked_count = monitor.counters()
    unreadable = sum(stats.unparsable.values())
    seen = stats.queries + stats.unobserved
    series = plane.telemetry.instrumentation.verdict_series()
    return {
        "generated_at": now,
        "poll_ms": POLL_MS,
        "summary": {
            "sidecars": len(sidecars),
            "synced": sum(1 for s in report.get("sidecars", []) if s.get("state") == "SYNCED"),
            "policies": len(policies),
            "quarantined": sum(1 for e in active if e.kind == "quarantine"),
            "throttled": sum(1 for e in active if e.kind == "throttle"),
            "clients": tracked_count,
            "observed": stats.queries,
            "unobserved": stats.unobserved,
            "unreadable": unreadable,
            "unobserved_share": round(stats.unobserved / seen, 4) if seen else 0.0,
        },
        "tables": {
            "sidecars": _table(
                "Sidecars",
                ["node", "service", "stream", "sync", "snapshot", "last NACK"],
                sidecars,
                "no sidecar connected",
            ),
            "policies": _table(
                "Policies",
                ["kind", "name", "Accepted", "Programmed", "generation", "sidecars", "messages"],
                policies,
                "no policy loaded",
            ),
            "clients": _table(
                "Clients by extraction risk",
                [
                    *("#", "client", "policy", "stage", "enforced", "queries", "unobserved"),
                    *(["est. fidelity"] if risks is not None else []),
                    "evidence (detector statistic ≥ threshold)",
                ],
                clients,
                "no client tracked yet",
            ),
            "quarantines": _table(
                "Active quarantines and throttles",
                ["kind", "client", "policy", "reason", "since (UTC)", "ends in", ""],
                quarantines,
                "none",
            ),
            "denials": _table(
                "Recent denials",
                ["time (UTC)", "service", "status", "verdict", "rule", "client (hash)", "route"],
                denials,
                "none",
            ),
            "budgets": _table(
                "Budget use (global limits, this window)",
                ["limit", "policy", "client", "used", "state"],
                budgets if isinstance(budgets, list) else [],
                budgets if isinstance(budgets, str) and budgets else "no budget asked about yet",
            ),
            "egress": _table(
                "Blocked egress",
                ["node", "destination", "protocol", "verdict", "policy", "count", "last"],
                egress,
                "none",
            ),
        },
        "series": [{"t": start, "counts": counts} for start, counts in series],
        "top": top,
    }


def release(plane: Sources, client: str) -> list[dict[str, str]]:
    """Release every quarantine and throttle of the client with this fingerprint (or this
    shown key); returns what was released, as the page names it."""
    monitor = plane.monitor
    targets = {
        (e.client.fingerprint, e.client.policy)
        for e in plane.verdicts.active()
        if client in (e.client.fingerprint, e.client.shown)
    }
    released = []
    # By fingerprint: the monitor and the verdict store both take one (ClientRef.named_by).
    for name, policy in sorted(targets):
        for e in monitor.release(name, policy):
            log.warning(
                "%s of %s (%s) released from the live page", e.kind, e.client.fingerprint, policy
            )
            released.append({"kind": e.kind, "client": e.client.fingerprint, "policy": policy})
    return released


# --- HTML -------------------------------------------------------------------------------------


def _cell(cell: Cell) -> str:
    if isinstance(cell, dict):
        text = htmllib.escape(cell.get("t", ""))
        if "release" in cell:
            return (
                f'<td><button class="release" data-client="{htmllib.escape(cell["release"])}" '
                f'data-name="{htmllib.escape(cell.get("name", ""))}">{text}</button></td>'
            )
        return f'<td class="{htmllib.escape(cell.get("cls", ""))}">{text}</td>'
    return f"<td>{htmllib.escape(cell)}</td>"


def render_table(name: str, table: dict[str, Any]) -> str:
    head = "".join(f"<th>{htmllib.escape(c)}</th>" for c in table["columns"])
    if table["rows"]:
        body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in table["rows"])
    else:
        body = (
            f'<tr><td class="empty" colspan="{len(table["columns"])}">'
            f"{htmllib.escape(table['empty'])}</td></tr>"
        )
    return (
        f'<section id="{name}"><h2>{htmllib.escape(table["title"])} '
        f'<span class="count">{len(table["rows"])}</span></h2>'
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></section>"
    )


def _summary(summary: dict[str, Any]) -> str:
    items = [
        ("sidecars in sync", f"{summary['synced']}/{summary['sidecars']}"),
        ("policies", summary["policies"]),
        ("quarantined", summary["quarantined"]),
        ("throttled", summary["throttled"]),
        ("clients tracked", summary["clients"]),
        ("queries observed", summary["observed"]),
        ("unobserved share", f"{summary['unobserved_share']:.1%}"),
        ("unreadable", summary["unreadable"]),
    ]
    return "".join(
        f'<div class="stat"><b>{htmllib.escape(str(v))}</b><span>{htmllib.escape(k)}</span></div>'
        for k, v in items
    )


ORDER = ("clients", "quarantines", "denials", "budgets", "sidecars", "policies", "egress")


def html(plane: Sources, budgets: list[list[Cell]] | str = "") -> str:
    data = state(plane, budgets)
    tables = "".join(render_table(name, data["tables"][name]) for name in ORDER)
    initial = json.dumps(data).replace("</", "<\\/")
    return (
        PAGE.replace("{summary}", _summary(data["summary"]))
        .replace("{tables}", tables)
        .replace("{initial}", initial)
    )


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>modelguard — live defense</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2430}
header{background:#1d2430;color:#fff;padding:10px 20px;display:flex;gap:16px;align-items:baseline}
header h1{font-size:18px;margin:0}header small{opacity:.7}
main{padding:12px 20px;display:grid;grid-template-columns:1fr;gap:14px;max-width:1400px}
#summary{display:flex;flex-wrap:wrap;gap:10px}
.stat{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:6px 12px;min-width:110px}
.stat b{display:block;font-size:20px}.stat span{color:#5b6474;font-size:12px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:8px 12px;overflow:auto}
h2{font-size:15px;margin:4px 0 8px}.count{color:#5b6474;font-weight:normal}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:3px 8px;
border-bottom:1px solid #eef0f3;white-space:nowrap}td:last-child{white-space:normal}
th{color:#5b6474;font-weight:600;font-size:12px}
.ok{color:#18794e;font-weight:600}.bad{color:#c62828;font-weight:600}
.warn{color:#a15c00;font-weight:600}.empty{color:#8a93a3}
button.release{background:#c62828;color:#fff;border:0;border-radius:4px;padding:2px 10px;
cursor:pointer}#chart svg{width:100%;height:180px}#risk svg{width:100%;height:120px}
.note{color:#5b6474;font-size:12px}#legend span{margin-right:12px}
#status{margin-left:auto}#notice{color:#ffd479;margin-left:auto}
</style></head><body>
<header><h1>modelguard</h1><small>live extraction defense</small>
<small id="notice"></small><small id="status">loading…</small></header>
<main>
<div id="summary">{summary}</div>
<section id="chart"><h2>Requests by verdict <span class="count">(per 5 s, last 10 min)</span>
</h2><svg viewBox="0 0 1000 180" preserveAspectRatio="none"></svg><div id="legend"></div>
</section>
<section id="risk"><h2>Top client's risk as its queries arrive <span class="count"
id="risk-client"></span></h2><svg viewBox="0 0 1000 180" preserveAspectRatio="none"></svg>
<div class="note">x: the client's queries; y: the monitor's estimated extraction fidelity
where it keeps one, else its stage (watching, suspected, detected) — since this page opened
</div></section>
<div id="tables">{tables}</div>
</main>
<script>
"use strict";
const ORDER = ["clients","quarantines","denials","budgets","sidecars","policies","egress"];
const COLORS = {allowed:"#18794e",hardened:"#2f6fdb",denied:"#c62828",
  rate_limited:"#a15c00",audit_denied:"#8e44ad",blocked:"#555",["would-block"]:"#999"};
let initial = {initial};
function esc(s){return String(s).replace(/[&<>"']/g,c=>({"&":"&amp;","<":"&lt;",
  ">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));}
function cell(c){
  if (typeof c === "string") return "<td>"+esc(c)+"</td>";
  if (c.release !== undefined) return '<td><button class="release" data-client="'+
    esc(c.release)+'" data-name="'+esc(c.name||"")+'">'+esc(c.t)+"</button></td>";
  return '<td class="'+esc(c.cls||"")+'">'+esc(c.t)+"</td>";
}
function table(name,t){
  const head = t.columns.map(c=>"<th>"+esc(c)+"</th>").join("");
  const body = t.rows.length ? t.rows.map(r=>"<tr>"+r.map(cell).join("")+"</tr>").join("")
    : '<tr><td class="empty" colspan="'+t.columns.length+'">'+esc(t.empty)+"</td></tr>";
  return '<section id="'+name+'"><h2>'+esc(t.title)+' <span class="count">'+t.rows.length+
    "</span></h2><table><thead><tr>"+head+"</tr></thead><tbody>"+body+"</tbody></table></section>";
}
function summary(s){
  const items = [["sidecars in sync", s.synced+"/"+s.sidecars],["policies",s.policies],
    ["quarantined",s.quarantined],["throttled",s.throttled],["clients tracked",s.clients],
    ["queries observed",s.observed],["unobserved share",(100*s.unobserved_share).toFixed(1)+"%"],
    ["unreadable",s.unreadable]];
  return items.map(([k,v])=>'<div class="stat"><b>'+esc(v)+"</b><span>"+esc(k)+
    "</span></div>").join("");
}
function chart(series){
  const svg = document.querySelector("#chart svg"), W=1000, H=170, step=5;
  const now = Math.floor(Date.now()/1000/step)*step, start = now-119*step;
  const names = [...new Set(series.flatMap(b=>Object.keys(b.counts)))].sort();
  const at = new Map(series.map(b=>[b.t,b.counts]));
  let max = 1;
  for (const b of series) for (const n of names) max = Math.max(max, b.counts[n]||0);
  let out = '<line x1="0" y1="'+H+'" x2="'+W+'" y2="'+H+'" stroke="#ccc"/>';
  for (const n of names){
    const pts = [];
    for (let i=0;i<120;i++){
      const c = (at.get(start+i*step)||{})[n]||0;
      pts.push((i*W/119).toFixed(1)+","+(H-c*(H-10)/max).toFixed(1));
    }
    out += '<polyline class="series" data-verdict="'+esc(n)+
      '" fill="none" stroke-width="2" stroke="'+
      (COLORS[n]||"#333")+'" points="'+pts.join(" ")+'"/>';
  }
  out += '<text x="4" y="12" font-size="11" fill="#5b6474">max '+max+"</text>";
  svg.innerHTML = out;
  document.getElementById("legend").innerHTML = names.map(n=>'<span style="color:'+
    (COLORS[n]||"#333")+'">■ '+esc(n)+"</span>").join("");
}
let adminToken = null;  // kept in this page only, asked for when a release needs it
const history = new Map();  // client → [[queries, level]] seen while the page is open
function risk(top){
  for (const c of top){
    const level = c.fidelity !== null ? c.fidelity :
      ({watching:0, suspected:0.5, detected:1}[c.stage] || 0);
    const h = history.get(c.client) || [];
    if (!h.length || h[h.length-1][0] !== c.queries || h[h.length-1][1] !== level)
      h.push([c.queries, level, c.fidelity !== null]);
    history.set(c.client, h.slice(-500));
  }
  const svg = document.querySelector("#risk svg"), W=1000, H=170;
  if (!top.length){ svg.innerHTML = ""; return; }
  const name = top[0].client, seen = history.get(name) || [];
  // Once the monitor estimates the client's fidelity, only estimates are drawn.
  const h = seen.some(p=>p[2]) ? seen.filter(p=>p[2]) : seen;
  document.getElementById("risk-client").textContent = name+" ("+top[0].stage+")";
  const maxQ = Math.max(1, ...h.map(p=>p[0]));
  const pts = h.map(p=>(p[0]*W/maxQ).toFixed(1)+","+(H-p[1]*(H-10)).toFixed(1));
  const dots = pts.map(p=>{const [x,y]=p.split(",");
    return '<circle cx="'+x+'" cy="'+y+'" r="4" fill="#c62828"/>';}).join("");
  svg.innerHTML = '<line x1="0" y1="'+H+'" x2="'+W+'" y2="'+H+'" stroke="#ccc"/>'+
    '<polyline id="risk-line" fill="none" stroke="#c62828" stroke-width="2" points="'+
    pts.join(" ")+'"/>'+dots+'<text x="4" y="12" font-size="11" fill="#5b6474">'+maxQ+
    " queries</text>";
}
function render(data){
  document.getElementById("summary").innerHTML = summary(data.summary);
  document.getElementById("tables").innerHTML = ORDER.map(n=>table(n,data.tables[n])).join("");
  chart(data.series);
  risk(data.top);
  document.getElementById("status").textContent = "updated "+
    new Date(data.generated_at*1000).toISOString().slice(11,19)+" UTC";
}
async function poll(){
  try {
    const r = await fetch("/ui/state",{cache:"no-store"});
    if (r.ok) render(await r.json()); else throw new Error(r.status);
  } catch(e) { document.getElementById("status").textContent = "control plane unreachable"; }
  setTimeout(poll, initial.poll_ms);
}
document.addEventListener("click", async ev => {
  const b = ev.target.closest("button.release");
  if (!b) return;
  b.disabled = true;
  const send = () => fetch("/ui/release",{method:"POST",headers:Object.assign(
    {"content-type":"application/json","x-modelguard-action":"release"},
    adminToken ? {"authorization":"Bearer "+adminToken} : {}),
    body:JSON.stringify({client:b.dataset.client})});
  let r = await send();
  if (r.status === 401) {  // the control plane runs with --admin-token-file
    adminToken = window.prompt("Admin token (--admin-token-file) to release "+b.dataset.name);
    if (adminToken) r = await send();
  }
  document.getElementById("notice").textContent = r.ok ? "released "+b.dataset.name
    : "release refused: "+(await r.text());
  const s = await fetch("/ui/state",{cache:"no-store"}); if (s.ok) render(await s.json());
});
render(initial);
setTimeout(poll, initial.poll_ms);
</script></body></html>
"""
