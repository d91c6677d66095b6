"""The Lua script that verifies the caller's API key in the sidecar (see ``rbac``, ``caller``).

After the connection manager dropped every ``x-modelguard-*`` header the caller sent
(``internal.strip_internal_headers``), it hashes ``x-api-key`` for RBAC to match and, given
the registered keys' metadata (``CallerIR``), names the verified caller:
``x-modelguard-key-id``, ``-tenant`` and ``-tier`` from the key's entry. A key sent beside
a verified JWT or client certificate must list that principal: the filter names the key's
set of principals (``x-modelguard-key-binding``, one label per distinct set) and the Deny
RBAC filter checks it natively (``rbac.binding_policy``), one match per set. It copies
verified JWT claims into ``x-modelguard-jwt-<claim>``, and names a caller without a
registered key by its source address (``addr:<ip>``, id and tenant), so no unkeyed caller
shares one client with every other.

LuaJIT's ``bit`` library gives a SHA-256 in a few tens of microseconds for a key-sized
input; it runs only when an AccessPolicy matches API keys. A client sends the same key on
every request, so each worker remembers the digests of the last ``CACHE_ENTRIES`` distinct
keys and hashes only keys it has not seen (bench/policy_tax.py: the hash was most of the
filter's cost).
"""

import re
from collections.abc import Iterable

from controlplane.ir import ApiKeyIR, CallerIR

CACHE_ENTRIES = 4096

API_KEY_HEADER = "x-api-key"
DIGEST_HEADER = "x-modelguard-api-key-sha256"
# The key class of the caller's digest (``rbac``): the set of rules that list it, by name.
CLASS_HEADER = "x-modelguard-api-key-class"
# The verified caller (CONTRACTS.md #1; the same names as controlplane/api/common.py).
KEY_ID_HEADER = "x-modelguard-key-id"
TENANT_HEADER = "x-modelguard-tenant"
TIER_HEADER = "x-modelguard-tier"
# The key's binding: which principals may present it, as a label per distinct set
# (``binding_labels``), for the Deny RBAC filter's binding check (``rbac.binding_policy``).
BINDING_HEADER = "x-modelguard-key-binding"
ANONYMOUS_PREFIX = "addr:"

# SHA-256 in LuaJIT (its ``bit`` library): shared with the verdict filter (``verdicts``).
SHA256_LUA = r"""
local bit = require("bit")
local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local rshift, lshift, ror, tobit, tohex = bit.rshift, bit.lshift, bit.ror, bit.tobit, bit.tohex
local byte, char, rep = string.byte, string.char, string.rep

local K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}

local function sha256(msg)
  local len = #msg
  local bits = len * 8
  msg = msg .. "\128" .. rep("\0", (55 - len) % 64) .. char(
    0, 0, 0, 0, band(rshift(bits, 24), 255), band(rshift(bits, 16), 255),
    band(rshift(bits, 8), 255), band(bits, 255))
  local h1, h2, h3, h4 = 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a
  local h5, h6, h7, h8 = 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19
  local w = {}
  for i = 1, #msg, 64 do
    for j = 0, 15 do
      local a, b, c, d = byte(msg, i + j * 4, i + j * 4 + 3)
      w[j] = bor(lshift(a, 24), lshift(b, 16), lshift(c, 8), d)
    end
    for j = 16, 63 do
      local x, y = w[j - 15], w[j - 2]
      local s0 = bxor(ror(x, 7), ror(x, 18), rshift(x, 3))
      local s1 = bxor(ror(y, 17), ror(y, 19), rshift(y, 10))
      w[j] = tobit(w[j - 16] + s0 + w[j - 7] + s1)
    end
    local a, b, c, d, e, f, g, h = h1, h2, h3, h4, h5, h6, h7, h8
    for j = 0, 63 do
      local s1 = bxor(ror(e, 6), ror(e, 11), ror(e, 25))
      local ch = bxor(band(e, f), band(bnot(e), g))
      local t1 = tobit(h + s1 + ch + K[j + 1] + w[j])
      local s0 = bxor(ror(a, 2), ror(a, 13), ror(a, 22))
      local maj = bxor(band(a, b), band(a, c), band(b, c))
      h, g, f, e, d, c, b = g, f, e, tobit(d + t1), c, b, a
      a = tobit(t1 + s0 + maj)
    end
    h1, h2, h3, h4 = tobit(h1 + a), tobit(h2 + b), tobit(h3 + c), tobit(h4 + d)
    h5, h6, h7, h8 = tobit(h5 + e), tobit(h6 + f), tobit(h7 + g), tobit(h8 + h)
  end
  return tohex(h1) .. tohex(h2) .. tohex(h3) .. tohex(h4) ..
         tohex(h5) .. tohex(h6) .. tohex(h7) .. tohex(h8)
end
""".strip()

_SOURCE = r"""
-- modelguard: add the SHA-256 digest of the caller's API key, for RBAC to match.
-- Generated configuration holds only digests, never a key (Envoy has no hashing matcher).
-- Any digest or class header the caller sent is dropped first, so it cannot be forged.
@HASH_FUNCTION@

-- Lua environments are per worker thread, so this cache needs no lock. It is bounded: a
-- caller cycling through random keys only makes it start over, and keys longer than any
-- real one are hashed every time rather than kept (headers may be up to 60 KiB).
local cache, cached = {}, 0

-- Digest -> {key id, tenant, tier, key class, binding}: false where unknown. The class
-- (the set of rules listing the digest) is for rules RBAC checks as policies; the binding
-- labels the set of principals that may present the key, which the Deny RBAC filter checks
-- against the verified certificate or JWT in one match per distinct set, not one per key.
local keys = @KEYS@
local claims = @CLAIMS@
local anonymous, stripped = @ANONYMOUS@, @STRIPPED@
local match = string.match

local function caller_address(handle)
  local remote = handle:streamInfo():downstreamRemoteAddress()
  return "addr:" .. (match(remote, "^%[(.*)%]:%d+$") or match(remote, "^(.*):%d+$") or remote)
end

function envoy_on_request(handle)
  local headers = handle:headers()
  -- With the caller filter, every x-modelguard-* header a caller sent is already gone:
  -- the connection manager's early header mutation removes them before any filter runs
  -- (translate/caller.py; a native prefix match, far cheaper than a header walk here).
  -- Without it, the two headers this filter writes for RBAC are dropped here.
  if not stripped then
    headers:remove("x-modelguard-api-key-sha256")
    headers:remove("x-modelguard-api-key-class")
  end
  local key = headers:get("x-api-key")
  local entry
  if key ~= nil and key ~= "" then
    local digest = cache[key]
    if digest == nil then
      digest = sha256(key)
      if #key <= 256 then
        if cached >= @CACHE_ENTRIES@ then
          cache, cached = {}, 0
        end
        cache[key], cached = digest, cached + 1
      end
    end
    headers:add("x-modelguard-api-key-sha256", digest)
    entry = keys[digest]
  end
  if entry ~= nil then
    if entry[4] then
      headers:add("x-modelguard-api-key-class", entry[4])
    end
    if entry[5] then
      headers:add("x-modelguard-key-binding", entry[5])
    end
    if entry[1] then
      headers:add("x-modelguard-key-id", entry[1])
      headers:add("x-modelguard-tenant", entry[2])
      if entry[3] then
        headers:add("x-modelguard-tier", entry[3])
      end
    end
  end
  -- Claims client keys read, from the payloads jwt_authn verified (before this filter).
  local address
  if claims[1] ~= nil then
    local jwt = handle:streamInfo():dynamicMetadata():get("envoy.filters.http.jwt_authn")
    for i = 1, #claims do
      local claim, value = claims[i], nil
      for _, payload in pairs(jwt or {}) do
        local v = type(payload) == "table" and payload[claim[1]] or nil
        if type(v) == "string" or type(v) == "number" then
          value = tostring(v)
          break
        end
      end
      if value == nil then
        -- No verified token (or no such claim): the caller is its address.
        address = address or caller_address(handle)
        value = address
      end
      headers:add(claim[2], value)
    end
  end
  if anonymous and (entry == nil or not entry[1]) then
    -- No registered key: the caller is its address (after the trusted hops of
    -- X-Forwarded-For, xff_num_trusted_hops), never one shared anonymous client.
    address = address or caller_address(handle)
    headers:add("x-modelguard-key-id", address)
    headers:add("x-modelguard-tenant", address)
  end
end
"""


_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _lua_string(text: str, what: str) -> str:
    # Every value is checked where it is loaded (identity/apikeys.py); this keeps the
    # generated source safe whatever a caller of this function passes.
    if any(c in '"\\' or ord(c) < 0x20 or ord(c) > 0x7E for c in text):
        raise ValueError(f"not a {what}: {text!r}")
    return f'"{text}"'


def _name(text: str, what: str) -> str:
    if not text or not set(text) <= _SAFE:
        raise ValueError(f"not a {what}: {text!r}")
    return f'"{text}"'


def script(
    cache_entries: int = CACHE_ENTRIES,
    classes: dict[str, str] | None = None,
    caller: CallerIR | None = None,
) -> str:
    """The filter's Lua source; ``cache_entries`` bounds each worker's digest cache,
    ``classes`` maps digests (hex) to the key class the filter names in ``CLASS_HEADER``,
    and ``caller`` gives the registered keys' metadata and what else to name."""
    classes = classes or {}
    keys = {k.digest: k for k in (caller.keys if caller else ())}
    bindings = binding_labels(caller.keys if caller else ())
    rows = []
    for digest in sorted(set(classes) | set(keys)):
        key = keys.get(digest)
        label = classes.get(digest)
        fields = [
            _name(key.id, "key id") if key else "false",
            _name(key.tenant, "tenant") if key else "false",
            _name(key.tier, "tier") if key and key.tier else "false",
            _name(label, "key class") if label else "false",
            _name(bindings[digest], "binding") if digest in bindings else "false",
        ]
        rows.append(f"\n  [{_name(digest, 'digest')}] = {{{', '.join(fields)}}},")
    table = "{" + "".join(rows) + ("\n}" if rows else "}")
    claims = (
        "{"
        + ", ".join(
            f"{{{_lua_string(c, 'claim')}, {_lua_string(claim_header(c), 'header')}}}"
            for c in (caller.jwt_claims if caller else ())
        )
        + "}"
    )

    def flag(value: bool) -> str:
        return "true" if value else "false"

    values = {
        "CACHE_ENTRIES": str(cache_entries),
        "KEYS": table,
        "CLAIMS": claims,
        "ANONYMOUS": flag(bool(caller and caller.anonymous_by_address)),
        "STRIPPED": flag(caller is not None),
        "HASH_FUNCTION": SHA256_LUA,
    }
    # One pass, so nothing inserted (a key id, a claim) is ever substituted again.
    return re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], _SOURCE)


def binding_labels(keys: Iterable[ApiKeyIR]) -> dict[str, str]:
    """Digest → the label of its key's set of principals (keys listing none have none).

    Keys listing the same principals share a label, so the binding check matches each
    distinct set once: one sidecar's callers are usually a few workloads, whatever the
    number of keys (bench/policy_tax.py: a match per key cost ~27k instructions a request
    at 100 keys)."""
    sets = {k.digest: tuple(sorted(set(k.principals))) for k in keys if k.principals}
    label = {members: f"bind-{i}" for i, members in enumerate(sorted(set(sets.values())))}
    return {digest: label[members] for digest, members in sorted(sets.items())}


def binding_sets(keys: Iterable[ApiKeyIR]) -> list[tuple[str, tuple[str, ...]]]:
    """Each binding label with its principals, in label order."""
    members = {k.digest: tuple(sorted(set(k.principals))) for k in keys}
    out = {label: members[digest] for digest, label in binding_labels(keys).items()}
    return sorted(out.items(), key=lambda item: int(item[0].removeprefix("bind-")))


def claim_header(claim: str) -> str:
    """The header a verified JWT claim is copied into (as controlplane/api/common.py)."""
    return "x-modelguard-jwt-" + re.sub(r"[^a-z0-9-]", "-", claim.lower())


SCRIPT = script()
