/* modelguard output hardening + query feed: a proxy-wasm HTTP filter (ABI 0.2.1, V8).
 *
 * Per request it reads the tier and, for the feed, the client key from the request headers
 * and keeps the request body (the query). On a JSON response it buffers the body, ships
 * the query and the model's *unhardened* answer to the control plane's query feed, then
 * rewrites the score vectors found at the configured JSON path: noise, top-k, rounding,
 * label-only.
 * Anything it cannot parse passes unchanged and is counted: the filter never breaks a
 * response. The feed is batched per worker and shipped by proxy_grpc_call off the request
 * path; what cannot be shipped is counted per client and reported as "unobserved".
 *
 * Cost: the filter's own code is a small part of it. Every host call that returns bytes
 * (a header, a body) re-enters the VM to allocate them (proxy_on_memory_allocate), which
 * under V8 costs about 10k instructions, as much as a whole callback; so each callback
 * makes as few such calls as it can: headers it needs two or more of come from one
 * proxy_get_header_map_pairs, and nothing is read that the configuration does not use
 * (bench/wasm_filter.py measures it).
 */
#include "abi.h"
#include "json.h"

/* ---------------------------------------------------------------------------------------
 * Small helpers
 */

typedef struct {
  u8 *p;
  u32 len, cap;
} Buf;

static int buf_reserve(Buf *b, u32 extra) {
  if (b->len + extra <= b->cap) return 1;
  u32 cap = b->cap ? b->cap : 256;
  while (cap < b->len + extra) cap *= 2;
  u8 *p = realloc(b->p, cap);
  if (!p) return 0;
  b->p = p;
  b->cap = cap;
  return 1;
}

static int buf_put(Buf *b, const void *data, u32 n) {
  if (!buf_reserve(b, n)) return 0;
  memcpy(b->p + b->len, data, n);
  b->len += n;
  return 1;
}

static void buf_free(Buf *b) {
  free(b->p);
  b->p = 0;
  b->len = b->cap = 0;
}

static void log_msg(i32 level, const char *msg) { proxy_log(level, msg, cstrlen(msg)); }

static char *dup_bytes(const char *s, u32 n) {
  char *d = malloc(n + 1);
  if (!d) return 0;
  memcpy(d, s, n);
  d[n] = 0;
  return d;
}

static int ieq(const u8 *a, const char *b, u32 n) { /* ASCII case-insensitive prefix match */
  for (u32 i = 0; i < n; i++) {
    u8 x = a[i], y = (u8)b[i];
    if (x >= 'A' && x <= 'Z') x = (u8)(x + 32);
    if (x != y) return 0;
  }
  return 1;
}

static int contains_json(const u8 *s, u32 n) {
  for (u32 i = 0; i + 4 <= n; i++)
    if (ieq(s + i, "json", 4)) return 1;
  return 0;
}

/* A header a callback wants, found by read_headers. */
typedef struct {
  const char *name; /* lower case */
  u32 len;
  const u8 *value; /* points into the buffer read_headers returns */
  u32 value_len;
  u8 found;
} Want;

static u32 le32(const u8 *p) {
  return (u32)p[0] | (u32)p[1] << 8 | (u32)p[2] << 16 | (u32)p[3] << 24;
}

/* Fills `want` from one header map with a single host call: proxy_get_header_map_value for
 * one header, proxy_get_header_map_pairs (the whole map) for more, which costs about the
 * same as one lookup. A header given twice yields its first value, as a lookup does.
 * Returns the buffer the values point into (the caller frees it), or NULL. */
static u8 *read_headers(i32 map, Want *want, u32 n) {
  u8 *data = 0;
  usize size = 0;
  if (n == 0) return 0;
  if (n == 1) {
    if (proxy_get_header_map_value(map, want[0].name, want[0].len, &data, &size) == WASM_OK) {
      want[0].value = data ? data : (const u8 *)"";
      want[0].value_len = (u32)size;
      want[0].found = 1;
    }
    return data;
  }
  if (proxy_get_header_map_pairs(map, &data, &size) != WASM_OK || !data || size < 4)
    return data;
  /* u32 count, count x (u32 key size, u32 value size), then each key and value + NUL */
  u32 count = le32(data);
  if (count > (size - 4) / 8) return data;
  const u8 *sizes = data + 4, *p = sizes + 8 * (usize)count, *end = data + size;
  u32 missing = n;
  for (u32 i = 0; i < count && missing; i++) {
    u32 klen = le32(sizes + 8 * i), vlen = le32(sizes + 8 * i + 4);
    if ((usize)(end - p) < (usize)klen + 1) break;
    const u8 *key = p;
    p += klen + 1;
    if ((usize)(end - p) < (usize)vlen + 1) break;
    const u8 *value = p;
    p += vlen + 1;
    for (u32 w = 0; w < n; w++)
      if (!want[w].found && want[w].len == klen && ieq(key, want[w].name, klen)) {
        want[w].value = value;
        want[w].value_len = vlen;
        want[w].found = 1;
        missing--;
      }
  }
  return data;
}

static char *dup_lower(const char *s, u32 n) {
  char *d = dup_bytes(s, n);
  if (d)
    for (u32 i = 0; i < n; i++)
      if (d[i] >= 'A' && d[i] <= 'Z') d[i] = (char)(d[i] + 32);
  return d;
}

static u64 parse_uint(const u8 *s, u32 n) {
  u64 v = 0;
  for (u32 i = 0; i < n && s[i] >= '0' && s[i] <= '9'; i++) v = v * 10 + (u64)(s[i] - '0');
  return v;
}

static u64 now_ms(void) {
  u64 ns = 0;
  proxy_get_current_time_nanoseconds(&ns);
  return ns / 1000000;
}

/* SipHash-2-4: the noise of a response is a keyed hash of its body, so a client can
 * neither predict it nor average it away by repeating the query. */
#define ROTL(x, b) (u64)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                         \
  do {                                                                                   \
    v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                            \
    v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                               \
    v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                               \
    v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                            \
  } while (0)

static u64 siphash(const u64 key[2], const u8 *in, u32 len) {
  u64 v0 = 0x736f6d6570736575ULL ^ key[0], v1 = 0x646f72616e646f6dULL ^ key[1];
  u64 v2 = 0x6c7967656e657261ULL ^ key[0], v3 = 0x7465646279746573ULL ^ key[1];
  u32 i = 0;
  for (; i + 8 <= len; i += 8) {
    u64 m = 0;
    for (int j = 7; j >= 0; j--) m = (m << 8) | in[i + j];
    v3 ^= m;
    SIPROUND;
    SIPROUND;
    v0 ^= m;
  }
  u64 b = (u64)len << 56;
  for (int j = 0; i + j < len; j++) b |= (u64)in[i + j] << (8 * j);
  v3 ^= b;
  SIPROUND;
  SIPROUND;
  v0 ^= b;
  v2 ^= 0xff;
  SIPROUND;
  SIPROUND;
  SIPROUND;
  SIPROUND;
  return v0 ^ v1 ^ v2 ^ v3;
}

static u64 splitmix(u64 *state) {
  u64 z = (*state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

/* ---------------------------------------------------------------------------------------
 * Configuration (one per root context: a plugin config pushed over ECDS)
 */

typedef struct {
  u8 active;
  u8 label_only;
  i32 top_k;        /* 0: keep all */
  i32 round_digits; /* -1: no rounding */
  double noise;     /* 0: none */
} Hardening;

enum { STEP_NAME, STEP_ANY, STEP_INDEX };
typedef struct {
  u8 kind;
  char *name;
  u32 len;
  u32 index;
} Step;

enum { KEY_NONE, KEY_HEADER, KEY_SOURCE_IP, KEY_IDENTITY };
enum { R_BUFFER_FULL, R_BODY_TOO_LARGE, R_CALL_FAILED, R_INCOMPLETE, R_COUNT };
/* "incomplete": the answer came before the whole request body (an early error, a reset). */
static const char *REASONS[R_COUNT] = {"buffer_full", "body_too_large", "call_failed",
                                       "incomplete"};

typedef struct {
  char *key;
  u32 len;
  u8 reason;
  u64 count;
  u64 instances; /* rows those requests carried, where counted */
} Count;

typedef struct {
  Count *items;
  u32 n, cap, limit;
} Counts;

enum {
  M_HARDENED,
  M_NOT_JSON,
  M_MALFORMED,
  M_UNMATCHED,
  M_TOO_LARGE,
  M_FEED_QUERIES,
  M_FEED_BATCHES,
  M_FEED_UNOBSERVED,
  M_FEED_CALL_FAILURES,
  M_REFUSED_SIZE,
  M_REFUSED_DEPTH,
  M_REFUSED_INSTANCES,
  M_DENIED_UNHARDENABLE,
  M_COUNT
};
static const char *METRIC_NAMES[M_COUNT] = {
    "hardened",   "passed_not_json", "passed_malformed", "passed_unmatched", "passed_too_large",
    "feed_queries", "feed_batches",  "feed_unobserved",  "feed_call_failures",
    "refused_too_large", "refused_too_deep", "refused_too_many_instances",
    "denied_unhardenable"};

/* A per-client tier override (riskOverrides, from the control plane's extraction-risk
 * estimate): the client `key` whose own tier is `from` ("" = any other) is answered with
 * tier `to` (an index into tiers; -1 keeps its own). Strings point into the config tree. */
typedef struct {
  const char *key, *from;
  u32 key_len, from_len;
  i32 to;
} Override;

typedef struct Root {
  u32 id;
  struct Root *next;
  u8 configured;
  JNode *config;
  const char *policy;
  u32 policy_len;
  u8 key_kind;
  char *key_header; /* lower case, like every header name below */
  u32 key_header_len;
  Step *steps;
  u32 nsteps;
  Hardening dflt;
  char *tier_header;
  u32 tier_header_len;
  u32 ntiers;
  char **tier_names;
  Hardening *tiers;
  Override *over;
  u32 nover;
  u32 over_digest; /* hex digits of the key's SHA-256 the overrides are keyed by; 0: the key */
  u32 max_body;
  u8 deny_unhardenable; /* an answer too large to harden is refused, not passed */
  u8 response_kserve;   /* scores select KServe v2 tensors: rows from their shape */
  Step *shape_steps;    /* kserve: the tensors' "shape" */
  u32 nshape_steps;
  /* Request limits, checked on the whole body before the model sees it (0: none). */
  u32 max_request, max_depth, max_instances;
  Step *inst_steps; /* where the rows are: each value there is one row ... */
  u32 ninst_steps;
  u8 inst_value;    /* ... or (kserve: the tensors' shape[0]) a number of rows */
  /* A budget charged per instance (cost: instances): the request header its class goes
   * in, for the quota filter behind this one (NULL: no such budget, or another filter
   * sets it). The request is held until its body is complete, as with limits. */
  char *class_header;
  u32 class_header_len;
  u32 metrics[M_COUNT];
  /* the query feed */
  u8 feed;
  Buf service; /* serialized envoy.config.core.v3.GrpcService */
  u32 feed_max_body, batch_queries, batch_bytes, max_in_flight, timeout_ms;
  char *node_id;
  u32 node_id_len;
  Buf batch; /* a FeedBatch being built: node_id and policy, then its queries */
  u32 batch_prefix; /* bytes of node_id and policy: an empty batch */
  u32 batch_count;
  Counts batch_clients; /* who is in the batch: charged as unobserved if the call fails */
  Counts unobserved;
  u32 in_flight;
  u64 sequence;
  u8 done_pending;
} Root;

typedef struct Stream {
  u32 id;
  struct Stream *next;
  Root *root;
  u8 *headers; /* the request header values key and path point into */
  u8 *key_buf; /* a key read from a property */
  const u8 *key;
  usize key_len;
  const Hardening *hardening;
  const u8 *path;
  usize path_len;
  Buf request;
  u8 request_too_large;
  u8 has_body;      /* the request has a body (its headers did not end the stream) */
  u8 body_complete; /* ... and all of it went past */
  u8 inspect;
  u8 done; /* fed (or counted as unobserved) */
  u8 refused; /* answered by the filter itself (a limit): the model never saw it */
  u32 status;
  u32 instances; /* rows the request carried (0: not counted) */
} Stream;

typedef struct Call {
  u32 token;
  struct Call *next;
  Root *root;
  Counts clients;
  u32 queries;
} Call;

static Root *roots;
static Call *calls;
#define STREAM_BUCKETS 256
static Stream *streams[STREAM_BUCKETS];
static u64 noise_key[2];

static Root *find_root(u32 id) {
  for (Root *r = roots; r; r = r->next)
    if (r->id == id) return r;
  return 0;
}

static Stream *find_stream(u32 id) {
  for (Stream *s = streams[id % STREAM_BUCKETS]; s; s = s->next)
    if (s->id == id) return s;
  return 0;
}

static void metric(Root *r, int m, i64 n) {
  if (r->metrics[m]) proxy_increment_metric(r->metrics[m], n);
}

/* --- counting per client ---------------------------------------------------------------- */

static void counts_add(Counts *c, const u8 *key, u32 len, u8 reason, u64 n, u64 inst) {
  for (u32 i = 0; i < c->n; i++) {
    Count *it = &c->items[i];
    if (it->reason == reason && it->len == len && memcmp(it->key, key, len) == 0) {
      it->count += n;
      it->instances += inst;
      return;
    }
  }
  if (c->n >= c->limit) {
    /* Bounded memory: past the limit, clients are pooled under the empty key. */
    key = (const u8 *)"";
    len = 0;
    for (u32 i = 0; i < c->n; i++)
      if (c->items[i].reason == reason && c->items[i].len == 0) {
        c->items[i].count += n;
        c->items[i].instances += inst;
        return;
      }
  }
  if (c->n == c->cap) {
    u32 cap = c->cap ? c->cap * 2 : 8;
    Count *items = realloc(c->items, cap * sizeof(Count));
    if (!items) return;
    c->items = items;
    c->cap = cap;
  }
  Count *it = &c->items[c->n++];
  it->key = dup_bytes((const char *)key, len);
  it->len = it->key ? len : 0;
  it->reason = reason;
  it->count = n;
  it->instances = inst;
}

static void counts_clear(Counts *c) {
  for (u32 i = 0; i < c->n; i++) free(c->items[i].key);
  c->n = 0;
}

static void counts_free(Counts *c) {
  counts_clear(c);
  free(c->items);
  c->items = 0;
  c->cap = 0;
}

/* --- configuration ---------------------------------------------------------------------- */

static u32 num_or(const JNode *obj, const char *key, u32 dflt) {
  JNode *n = json_get(obj, key);
  return n && n->type == J_NUMBER && n->number >= 0 ? (u32)n->number : dflt;
}

static Hardening read_hardening(const JNode *h) {
  Hardening out = {0, 0, 0, -1, 0};
  if (!h || h->type != J_OBJECT) return out;
  JNode *n;
  if ((n = json_get(h, "topK")) && n->type == J_NUMBER) out.top_k = (i32)n->number;
  if ((n = json_get(h, "roundDigits")) && n->type == J_NUMBER) out.round_digits = (i32)n->number;
  if ((n = json_get(h, "labelOnly")) && n->type == J_BOOL) out.label_only = n->boolean;
  if ((n = json_get(h, "noise")) && n->type == J_NUMBER) out.noise = n->number;
  if (out.round_digits > 10) out.round_digits = 10;
  if (out.noise < 0) out.noise = 0;
  out.active = out.label_only || out.top_k > 0 || out.round_digits >= 0 || out.noise > 0;
  return out;
}

static void put_varint(Buf *b, u64 v) {
  u8 tmp[10];
  u32 n = 0;
  do {
    u8 byte = v & 0x7f;
    v >>= 7;
    tmp[n++] = v ? (u8)(byte | 0x80) : byte;
  } while (v);
  buf_put(b, tmp, n);
}

static void put_bytes_field(Buf *b, u32 field, const void *data, u32 len) {
  put_varint(b, (u64)(field << 3 | 2));
  put_varint(b, len);
  buf_put(b, data, len);
}

static u32 varint_size(u64 v) {
  u32 n = 1;
  while (v >= 0x80) {
    v >>= 7;
    n++;
  }
  return n;
}

/* A JSON array of keys (strings), indices (numbers) and wildcards (null), plus `extra`
 * names appended (kserve: "data", "shape", 0 after the tensor's path). */
static u32 read_steps(const JNode *path, Step **out, const char *extra1, i32 extra2) {
  u32 n = 0;
  if (path && path->type == J_ARRAY)
    for (JNode *s = path->child; s; s = s->next) n++;
  Step *steps = malloc((n + 2) * sizeof(Step));
  *out = steps;
  if (!steps) return 0;
  u32 k = 0;
  if (path && path->type == J_ARRAY)
    for (JNode *s = path->child; s; s = s->next) {
      Step *st = &steps[k++];
      memset(st, 0, sizeof(Step));
      if (s->type == J_STRING) {
        st->kind = STEP_NAME;
        st->name = dup_bytes(s->str, s->str_len);
        st->len = s->str_len;
      } else if (s->type == J_NUMBER) {
        st->kind = STEP_INDEX;
        st->index = (u32)s->number;
      } else {
        st->kind = STEP_ANY;
      }
    }
  if (extra1) {
    Step *st = &steps[k++];
    memset(st, 0, sizeof(Step));
    st->kind = STEP_NAME;
    st->len = (u32)cstrlen(extra1);
    st->name = dup_bytes(extra1, st->len);
  }
  if (extra2 >= 0) {
    Step *st = &steps[k++];
    memset(st, 0, sizeof(Step));
    st->kind = STEP_INDEX;
    st->index = (u32)extra2;
  }
  return k;
}

static void free_steps(Step *steps, u32 n) {
  for (u32 i = 0; i < n; i++) free(steps[i].name);
  free(steps);
}

static void free_root_config(Root *r) {
  free_steps(r->shape_steps, r->nshape_steps);
  free_steps(r->inst_steps, r->ninst_steps);
  r->shape_steps = r->inst_steps = 0;
  r->nshape_steps = r->ninst_steps = 0;
  for (u32 i = 0; i < r->nsteps; i++) free(r->steps[i].name);
  free(r->steps);
  for (u32 i = 0; i < r->ntiers; i++) free(r->tier_names[i]);
  free(r->tier_names);
  free(r->tiers);
  free(r->over);
  r->over = 0;
  r->nover = 0;
  free(r->key_header);
  free(r->tier_header);
  free(r->class_header);
  r->class_header = 0;
  r->class_header_len = 0;
  free(r->node_id);
  buf_free(&r->service);
  json_free(r->config);
  r->steps = 0;
  r->nsteps = r->ntiers = 0;
  r->tier_names = 0;
  r->tiers = 0;
  r->key_header = r->tier_header = r->node_id = 0;
  r->key_header_len = r->tier_header_len = r->node_id_len = 0;
  r->config = 0;
}

/* SHA-256 (FIPS 180-4), for the override lookup only: header keys are secrets, so the
 * control plane sends their digests (as verdicts hold them), never the keys. */
static const u32 K256[64] = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(u32 h[8], const u8 *p) {
  u32 w[64];
  for (int i = 0; i < 16; i++)
    w[i] = (u32)p[4 * i] << 24 | (u32)p[4 * i + 1] << 16 | (u32)p[4 * i + 2] << 8 | p[4 * i + 3];
  for (int i = 16; i < 64; i++) {
    u32 s0 = ROTR(w[i - 15], 7) ^ ROTR(w[i - 15], 18) ^ (w[i - 15] >> 3);
    u32 s1 = ROTR(w[i - 2], 17) ^ ROTR(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  u32 a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
  for (int i = 0; i < 64; i++) {
    u32 t1 = hh + (ROTR(e, 6) ^ ROTR(e, 11) ^ ROTR(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
    u32 t2 = (ROTR(a, 2) ^ ROTR(a, 13) ^ ROTR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
    hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
  }
  h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
}

/* The first 2 * nbytes lower-case hex digits of SHA-256(msg) into hex. */
static void sha256_hex(const u8 *msg, usize len, char *hex, u32 nbytes) {
  u32 h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  u8 block[64];
  usize done = 0;
  for (; len - done >= 64; done += 64) sha256_block(h, msg + done);
  usize rest = len - done;
  memset(block, 0, 64);
  memcpy(block, msg + done, rest);
  block[rest] = 0x80;
  if (rest >= 56) {
    sha256_block(h, block);
    memset(block, 0, 64);
  }
  u64 bits = (u64)len * 8;
  for (int i = 0; i < 8; i++) block[63 - i] = (u8)(bits >> (8 * i));
  sha256_block(h, block);
  static const char digits[] = "0123456789abcdef";
  for (u32 i = 0; i < nbytes; i++) {
    u8 byte = (u8)(h[i / 4] >> (24 - 8 * (i % 4)));
    hex[2 * i] = digits[byte >> 4];
    hex[2 * i + 1] = digits[byte & 15];
  }
}

/* riskOverrides: {"<client key>": {"<its tier, or empty>": "<tier to answer with, or empty>"}}.
 * Flattened into one array: the control plane caps it at a few hundred clients, so a
 * linear scan per request costs less than building a table would. */
static void read_overrides(Root *r, const JNode *map) {
  if (!map || map->type != J_OBJECT) return;
  u32 n = 0;
  for (const JNode *c = map->child; c; c = c->next)
    if (c->type == J_OBJECT)
      for (const JNode *t = c->child; t; t = t->next) n++;
  if (!n) return;
  r->over = malloc(n * sizeof(Override));
  for (const JNode *c = map->child; c; c = c->next) {
    if (c->type != J_OBJECT) continue;
    for (const JNode *t = c->child; t; t = t->next) {
      Override *o = &r->over[r->nover++];
      *o = (Override){c->key, t->key, c->key_len, t->key_len, -1};
      for (u32 i = 0; t->type == J_STRING && i < r->ntiers; i++)
        if (cstrlen(r->tier_names[i]) == t->str_len &&
            memcmp(r->tier_names[i], t->str, t->str_len) == 0)
          o->to = (i32)i;
    }
  }
}

/* The override for this client and its own tier (or, failing that, for any tier). Keys
 * are digests (riskKeyDigest: hex digits of the key's SHA-256) or, when not secrets
 * (SPIFFE IDs, addresses), the keys themselves. */
static void apply_override(Stream *s, const u8 *tier, usize tier_len) {
  const Root *r = s->root;
  const Override *any = 0;
  char hex[64];
  const u8 *key = s->key;
  usize key_len = s->key_len;
  if (r->over_digest) {
    key_len = r->over_digest;
    sha256_hex(s->key, s->key_len, hex, (u32)key_len / 2);
    key = (const u8 *)hex;
  }
  for (u32 i = 0; i < r->nover; i++) {
    const Override *o = &r->over[i];
    if (o->key_len != key_len || memcmp(o->key, key, key_len) != 0) continue;
    if (o->from_len == 0) {
      any = o;
    } else if (tier && o->from_len == tier_len && memcmp(o->from, tier, tier_len) == 0) {
      any = o;
      break;
    }
  }
  if (any && any->to >= 0) s->hardening = &r->tiers[any->to];
}

static int configure(Root *r, const char *text, u32 len) {
  JNode *cfg = json_parse(text, len);
  if (!cfg || cfg->type != J_OBJECT) {
    json_free(cfg);
    log_msg(LOG_ERROR, "modelguard: plugin configuration is not a JSON object");
    return 0;
  }
  free_root_config(r);
  r->config = cfg;
  JNode *n = json_get(cfg, "policy");
  r->policy = n && n->type == J_STRING ? n->str : "";
  r->policy_len = n && n->type == J_STRING ? n->str_len : 0;

  JNode *key = json_get(cfg, "clientKey");
  r->key_kind = KEY_NONE;
  if ((n = json_get(key, "header")) && n->type == J_STRING) {
    r->key_kind = KEY_HEADER;
    r->key_header = dup_lower(n->str, n->str_len);
    r->key_header_len = r->key_header ? n->str_len : 0;
  } else if ((n = json_get(key, "sourceIP")) && n->type == J_BOOL && n->boolean) {
    r->key_kind = KEY_SOURCE_IP;
  } else if ((n = json_get(key, "identity")) && n->type == J_BOOL && n->boolean) {
    r->key_kind = KEY_IDENTITY;
  }

  JNode *path = json_get(cfg, "scores");
  r->response_kserve = json_is(json_get(cfg, "responseFormat"), "kserveV2");
  /* kserve: the path selects output tensors; their numbers are in "data", rows in "shape" */
  r->nsteps = read_steps(path, &r->steps, r->response_kserve ? "data" : 0, -1);
  if (r->response_kserve) r->nshape_steps = read_steps(path, &r->shape_steps, "shape", -1);
  r->deny_unhardenable = json_is(json_get(cfg, "onUnhardenable"), "Deny");

  JNode *req = json_get(cfg, "request");
  r->max_request = num_or(req, "maxBytes", 0);
  r->max_depth = num_or(req, "maxDepth", 0);
  r->max_instances = num_or(req, "maxInstances", 0);
  if ((n = json_get(req, "instancesHeader")) && n->type == J_STRING && n->str_len) {
    r->class_header = dup_lower(n->str, n->str_len);
    r->class_header_len = r->class_header ? n->str_len : 0;
  }
  JNode *inst = json_get(req, "instances");
  if (inst && inst->type == J_ARRAY) {
    r->inst_value = json_is(json_get(req, "format"), "kserveV2");
    r->ninst_steps = read_steps(inst, &r->inst_steps, r->inst_value ? "shape" : 0,
                                r->inst_value ? 0 : -1);
  }

  r->dflt = read_hardening(json_get(cfg, "output"));
  if ((n = json_get(cfg, "tierHeader")) && n->type == J_STRING) {
    r->tier_header = dup_lower(n->str, n->str_len);
    r->tier_header_len = r->tier_header ? n->str_len : 0;
  }
  JNode *tiers = json_get(cfg, "tiers");
  if (tiers && tiers->type == J_OBJECT) {
    for (JNode *t = tiers->child; t; t = t->next) r->ntiers++;
    r->tier_names = malloc((r->ntiers ? r->ntiers : 1) * sizeof(char *));
    r->tiers = malloc((r->ntiers ? r->ntiers : 1) * sizeof(Hardening));
    u32 i = 0;
    for (JNode *t = tiers->child; t; t = t->next, i++) {
      r->tier_names[i] = dup_bytes(t->key, t->key_len);
      r->tiers[i] = read_hardening(t);
    }
  }
  read_overrides(r, json_get(cfg, "riskOverrides"));
  r->over_digest = num_or(cfg, "riskKeyDigest", 0);
  if (r->over_digest > 64 || r->over_digest % 2) r->over_digest = 0;
  r->max_body = num_or(cfg, "maxBodyBytes", 1 << 20);

  JNode *feed = json_get(cfg, "feed");
  r->feed = feed && feed->type == J_OBJECT;
  if (r->feed) {
    JNode *cluster = json_get(feed, "cluster");
    if (!cluster || cluster->type != J_STRING) {
      log_msg(LOG_ERROR, "modelguard: feed.cluster missing");
      return 0;
    }
    /* GrpcService { envoy_grpc (1) { cluster_name (1) } } */
    Buf inner = {0};
    put_bytes_field(&inner, 1, cluster->str, cluster->str_len);
    put_bytes_field(&r->service, 1, inner.p, inner.len);
    buf_free(&inner);
    r->feed_max_body = num_or(feed, "maxBodyBytes", 64 * 1024);
    r->batch_queries = num_or(feed, "batchQueries", 128);
    r->batch_bytes = num_or(feed, "batchBytes", 1 << 20);
    r->max_in_flight = num_or(feed, "maxInFlight", 4);
    r->timeout_ms = num_or(feed, "timeoutMs", 5000);
    u32 flush_ms = num_or(feed, "flushMs", 250);
    if (r->batch_queries == 0) r->batch_queries = 1;
    proxy_set_tick_period_milliseconds(flush_ms ? flush_ms : 250);
    /* From the control plane, which knows which sidecar it configures. */
    if ((n = json_get(feed, "nodeId")) && n->type == J_STRING) {
      r->node_id = dup_bytes(n->str, n->str_len);
      r->node_id_len = n->str_len;
    }
    /* The batch starts with what every message of this root carries; queries follow, and
     * flush appends the rest to the same buffer, so a batch is never copied. Queries kept
     * from an earlier configuration move behind the new prefix. */
    Buf batch = {0};
    if (r->node_id_len) put_bytes_field(&batch, 1, r->node_id, r->node_id_len);
    put_bytes_field(&batch, 2, r->policy, r->policy_len);
    u32 prefix = batch.len;
    if (r->batch.len > r->batch_prefix)
      buf_put(&batch, r->batch.p + r->batch_prefix, r->batch.len - r->batch_prefix);
    buf_free(&r->batch);
    r->batch = batch;
    r->batch_prefix = prefix;
  }
  r->batch_clients.limit = 64;
  r->unobserved.limit = 1024;

  /* Stats are per policy: modelguard.<namespace>.<name>.<what> */
  char name[192];
  u32 plen = r->policy_len < 120 ? r->policy_len : 120;
  for (int m = 0; m < M_COUNT; m++) {
    u32 k = 0;
    memcpy(name, "modelguard.", 11);
    k = 11;
    for (u32 i = 0; i < plen; i++) name[k++] = r->policy[i] == '/' ? '.' : r->policy[i];
    name[k++] = '.';
    usize mlen = cstrlen(METRIC_NAMES[m]);
    memcpy(name + k, METRIC_NAMES[m], mlen);
    k += (u32)mlen;
    r->metrics[m] = 0;
    proxy_define_metric(METRIC_COUNTER, name, k, &r->metrics[m]);
  }
  r->configured = 1;
  return 1;
}

/* ---------------------------------------------------------------------------------------
 * The query feed
 */

static void call_add(Call *c) {
  c->next = calls;
  calls = c;
}

static Call *call_take(u32 token) {
  for (Call **p = &calls; *p; p = &(*p)->next)
    if ((*p)->token == token) {
      Call *c = *p;
      *p = c->next;
      return c;
    }
  return 0;
}

/* Well-formed UTF-8 (RFC 3629: no overlongs, no surrogates, nothing past U+10FFFF). A
 * proto3 string must be: one key that is not would make the monitor refuse the batch. */
static int utf8_valid(const u8 *s, u32 n) {
  for (u32 i = 0; i < n;) {
    u8 c = s[i];
    if (c < 0x80) {
      i++;
      continue;
    }
    u32 len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 0;
    if (len == 0 || c > 0xF4 || i + len > n) return 0;
    for (u32 k = 1; k < len; k++)
      if ((s[i + k] & 0xC0) != 0x80) return 0;
    u8 d = s[i + 1];
    if ((c == 0xE0 && d < 0xA0) || (c == 0xED && d > 0x9F) || (c == 0xF0 && d < 0x90) ||
        (c == 0xF4 && d > 0x8F))
      return 0;
    i += len;
  }
  return 1;
}

/* A client key: as client_key (1) when it is UTF-8, else as client_key_raw (`raw`). */
static void put_key(Buf *b, u32 raw, const void *key, u32 len) {
  if (len == 0) return;
  put_bytes_field(b, utf8_valid(key, len) ? 1 : raw, key, len);
}

static void unobserved(Root *r, const u8 *key, u32 len, u8 reason, u64 n, u64 inst) {
  counts_add(&r->unobserved, key, len, reason, n, inst);
  metric(r, M_FEED_UNOBSERVED, (i64)n);
}

/* Ships the pending batch; must run with the root as the effective context, so the call
 * outlives the stream that triggered it. Returns 0 if it could not be sent. */
static int flush(Root *r) {
  if (!r->feed || (r->batch_count == 0 && r->unobserved.n == 0)) return 1;
  if (r->in_flight >= r->max_in_flight) return 0;
  /* node_id (1), policy (2) and the queries (3) are in the batch; the rest follows them. */
  Buf *msg = &r->batch;
  u32 queries_end = msg->len;
  for (u32 i = 0; i < r->unobserved.n; i++) {
    Count *u = &r->unobserved.items[i];
    Buf item = {0};
    put_key(&item, 4, u->key, u->len);
    put_varint(&item, 2 << 3);
    put_varint(&item, u->count);
    const char *reason = REASONS[u->reason];
    put_bytes_field(&item, 3, reason, (u32)cstrlen(reason));
    if (u->instances) {
      put_varint(&item, 5 << 3);
      put_varint(&item, u->instances);
    }
    put_bytes_field(msg, 4, item.p, item.len);
    buf_free(&item);
  }
  put_varint(msg, 5 << 3);
  put_varint(msg, ++r->sequence);
  static const char SERVICE[] = "modelguard.feed.v1.QueryFeed";
  static const char METHOD[] = "Report";
  u32 token = 0;
  i32 rc = proxy_grpc_call(r->service.p, r->service.len, SERVICE, sizeof(SERVICE) - 1, METHOD,
                           sizeof(METHOD) - 1, 0, 0, msg->p, msg->len, r->timeout_ms, &token);
  if (rc != WASM_OK) {
    msg->len = queries_end; /* the queries stay for the next attempt */
    metric(r, M_FEED_CALL_FAILURES, 1);
    return 0;
  }
  Call *c = malloc(sizeof(Call));
  if (c) {
    memset(c, 0, sizeof(Call));
    c->token = token;
    c->root = r;
    c->queries = r->batch_count;
    c->clients = r->batch_clients; /* the call owns the summary now */
    c->clients.limit = r->batch_clients.limit;
    call_add(c);
  } else {
    counts_free(&r->batch_clients);
  }
  memset(&r->batch_clients, 0, sizeof(Counts));
  r->batch_clients.limit = 64;
  r->in_flight++;
  metric(r, M_FEED_BATCHES, 1);
  metric(r, M_FEED_QUERIES, r->batch_count);
  r->batch.len = r->batch_prefix;
  r->batch_count = 0;
  counts_clear(&r->unobserved);
  return 1;
}

static int flush_as_root(Root *r, u32 current) {
  proxy_set_effective_context(r->id);
  int ok = flush(r);
  proxy_set_effective_context(current);
  return ok;
}

/* Encodes one Query into the root's batch (FeedBatch.queries, field 3). */
static void feed_query(Stream *s, const u8 *response, u32 response_len) {
  Root *r = s->root;
  s->done = 1;
  const u8 *key = s->key ? s->key : (const u8 *)"";
  u32 key_len = (u32)s->key_len;
  u32 inst = s->instances;
  if (s->request_too_large) {
    unobserved(r, key, key_len, R_BODY_TOO_LARGE, 1, inst);
    return;
  }
  if (!s->body_complete) {
    unobserved(r, key, key_len, R_INCOMPLETE, 1, inst);
    return;
  }
  /* An answer too large to ship: the query still goes, without it (the monitor then
   * judges the rows without their classes), rather than not at all. */
  if (response_len > r->feed_max_body) response_len = 0;
  const u8 *path = s->path;
  u32 path_len = (u32)s->path_len;
  if (path_len && !utf8_valid(path, path_len)) path_len = 0;
  u64 t = now_ms();
  u32 qlen = (key_len ? 1 + varint_size(key_len) + key_len : 0) + 1 + varint_size(t) + 1 +
             varint_size(s->status) + 1 + varint_size(s->request.len) + s->request.len + 1 +
             varint_size(response_len) + response_len + 1 + varint_size(path_len) + path_len +
             (inst ? 1 + varint_size(inst) : 0);
  u32 total = 1 + varint_size(qlen) + qlen;
  if (total > r->batch_bytes) {
    unobserved(r, key, key_len, R_BODY_TOO_LARGE, 1, inst);
    return;
  }
  if (r->batch.len - r->batch_prefix + total > r->batch_bytes && !flush_as_root(r, s->id)) {
    unobserved(r, key, key_len, R_BUFFER_FULL, 1, inst);
    return;
  }
  if (!buf_reserve(&r->batch, total)) {
    unobserved(r, key, key_len, R_BUFFER_FULL, 1, inst);
    return;
  }
  Buf *b = &r->batch;
  put_varint(b, 3 << 3 | 2);
  put_varint(b, qlen);
  put_key(b, 7, key, key_len);
  put_varint(b, 2 << 3);
  put_varint(b, t);
  put_varint(b, 3 << 3);
  put_varint(b, s->status);
  put_bytes_field(b, 4, s->request.p, s->request.len);
  put_bytes_field(b, 5, response, response_len);
  put_bytes_field(b, 6, path, path_len);
  if (inst) {
    put_varint(b, 8 << 3);
    put_varint(b, inst);
  }
  r->batch_count++;
  counts_add(&r->batch_clients, key, key_len, 0, 1, inst);
  if (r->batch_count >= r->batch_queries) flush_as_root(r, s->id);
}

/* ---------------------------------------------------------------------------------------
 * Output hardening
 */

enum { T_VECTOR, T_NUMBER, T_FLAT };
typedef struct {
  u32 start, end;   /* the array's bytes in the body, brackets included */
  u32 first, count; /* its numbers in the scratch arrays */
  u8 kind;  /* a score vector, one bare number (a single score), or a flat tensor's data */
  u32 leaf; /* which value at the path it came from (kserve: pairs data with its shape) */
} Target;

typedef struct {
  const u8 *base, *end;
  const Step *steps;
  u32 nsteps;
  int error;
  u8 nested; /* kserve: data at the path may be nested arrays of rows */
  u8 count_mode; /* count the values at the path instead of collecting score vectors */
  u8 count_value; /* ... taking the number found there (kserve: the largest shape[0]) */
  u8 inside; /* kserve: within one tensor's nested data */
  u64 counted;
  u32 leaves; /* values at the path seen so far */
  /* count mode: each container's closing bracket by the offset of its opening one, from
   * the request's depth check (check_body), so a row is skipped without a second pass */
  const u32 *close_at;
} Scan;

/* Per-VM scratch reused by every response: a worker runs one callback at a time. */
static Target *targets;
static u32 ntargets, targets_cap;
static double *nums;
static u32 *num_start, *num_end;
static u32 nnums, nums_cap;
static Buf out;
static double *work;
static u8 *show_buf, *keep_buf;
static u32 work_cap;

static int push_target(Target t) {
  if (ntargets == targets_cap) {
    u32 cap = targets_cap ? targets_cap * 2 : 16;
    Target *p = realloc(targets, cap * sizeof(Target));
    if (!p) return 0;
    targets = p;
    targets_cap = cap;
  }
  targets[ntargets++] = t;
  return 1;
}

static int push_num(double v, u32 start, u32 end) {
  if (nnums == nums_cap) {
    u32 cap = nums_cap ? nums_cap * 2 : 256;
    double *a = realloc(nums, cap * sizeof(double));
    if (a) nums = a;
    u32 *b = realloc(num_start, cap * sizeof(u32));
    if (b) num_start = b;
    u32 *c = realloc(num_end, cap * sizeof(u32));
    if (c) num_end = c;
    if (!a || !b || !c) return 0;
    nums_cap = cap;
  }
  nums[nnums] = v;
  num_start[nnums] = start;
  num_end[nnums] = end;
  nnums++;
  return 1;
}

static const u8 *scan_value(Scan *sc, const u8 *p, i32 step, int depth);

/* Skips one value without reading it (no number is parsed): a container by its brackets
 * outside strings, a scalar up to the next delimiter. For counting rows, where the value
 * itself does not matter; the request was checked for depth already. NULL if unbalanced. */
static const u8 *skip_value(const u8 *p, const u8 *end) {
  if (p < end && *p == '"') return json_skip_string(p, end);
  if (p < end && (*p == '[' || *p == '{')) {
    u32 depth = 0;
    for (; p < end; p++) {
      u8 c = *p;
      if (c == '"') {
        p = json_skip_string(p, end);
        if (!p) return 0;
        p--;
      } else if (c == '[' || c == '{') {
        depth++;
      } else if (c == ']' || c == '}') {
        if (--depth == 0) return p + 1;
      }
    }
    return 0;
  }
  while (p < end && *p != ',' && *p != ']' && *p != '}' && *p != ' ' && *p != '\n' &&
         *p != '\r' && *p != '\t')
    p++;
  return p;
}

/* An array of numbers at a matched path: a score vector. NULL if it is something else. */
static const u8 *scan_scores(Scan *sc, const u8 *p) {
  const u8 *start = p;
  u32 first = nnums;
  p = json_skip_ws(p + 1, sc->end);
  if (p < sc->end && *p == ']') return 0;
  for (;;) {
    double v;
    const u8 *after = json_number(p, sc->end, &v);
    if (!after) break;
    if (!push_num(v, (u32)(p - sc->base), (u32)(after - sc->base))) break;
    p = json_skip_ws(after, sc->end);
    if (p < sc->end && *p == ',') {
      p = json_skip_ws(p + 1, sc->end);
      continue;
    }
    if (p < sc->end && *p == ']') {
      Target t = {(u32)(start - sc->base), (u32)(p + 1 - sc->base), first, nnums - first,
                  T_VECTOR, sc->leaves};
      if (!push_target(t)) break;
      return p + 1;
    }
    break;
  }
  nnums = first;
  return 0;
}

static int step_matches(const Step *st, const u8 *key, u32 key_len, i32 index) {
  if (st->kind == STEP_ANY) return 1;
  if (st->kind == STEP_INDEX) return index >= 0 && (u32)index == st->index;
  return index < 0 && st->len == key_len && memcmp(st->name, key, key_len) == 0;
}

static const u8 *scan_value(Scan *sc, const u8 *p, i32 step, int depth) {
  if (depth > 64) return 0;
  p = json_skip_ws(p, sc->end);
  if (p >= sc->end) return 0;
  u8 c = *p;
  int at_leaf = step >= 0 && (u32)step == sc->nsteps;
  if (at_leaf && sc->count_mode) {
    /* One row per value at the path, or (kserve) the number of rows found there. */
    if (sc->count_value) {
      double v;
      const u8 *after = json_number(p, sc->end, &v);
      if (after) {
        /* every input tensor has the same rows: the largest shape[0] counts, not the sum */
        u64 rows = v > 0 ? (v < 4e9 ? (u64)v : 4000000000ULL) : 0;
        if (rows > sc->counted) sc->counted = rows;
        return after;
      }
    }
    sc->counted++;
    if (sc->close_at && (c == '[' || c == '{')) return sc->base + sc->close_at[p - sc->base] + 1;
    return skip_value(p, sc->end);
  }
  if (at_leaf && c != '[' && c != '{' && c != '"') {
    /* A number where scores are: one row's single score (regression, binary). */
    double v;
    const u8 *after = json_number(p, sc->end, &v);
    if (after) {
      Target t = {(u32)(p - sc->base), (u32)(after - sc->base), nnums, 1, T_NUMBER, sc->leaves};
      if (push_num(v, t.start, t.end) && push_target(t)) {
        if (!sc->inside) sc->leaves++;
        return after;
      }
      return 0;
    }
  }
  if (c == '[') {
    /* kserve data nested as rows ([[...], [...]]): each inner array is one row */
    int rows = at_leaf && sc->nested && !sc->inside;
    if (at_leaf) {
      const u8 *after = scan_scores(sc, p);
      if (after) {
        if (rows) targets[ntargets - 1].kind = T_FLAT;
        if (!sc->inside) sc->leaves++;
        return after;
      }
    }
    p = json_skip_ws(p + 1, sc->end);
    if (p < sc->end && *p == ']') return p + 1;
    if (rows) sc->inside = 1;
    for (i32 i = 0;; i++) {
      i32 next = rows ? step
                 : step >= 0 && (u32)step < sc->nsteps && step_matches(&sc->steps[step], 0, 0, i)
                     ? step + 1
                     : -1;
      p = scan_value(sc, p, next, depth + 1);
      if (!p) break;
      p = json_skip_ws(p, sc->end);
      if (p < sc->end && *p == ',') {
        p++;
        continue;
      }
      if (p < sc->end && *p == ']') {
        if (rows) {
          sc->inside = 0;
          sc->leaves++;
        }
        return p + 1;
      }
      break;
    }
    sc->inside = 0;
    return 0;
  }
  if (c == '{') {
    p = json_skip_ws(p + 1, sc->end);
    if (p < sc->end && *p == '}') return p + 1;
    for (;;) {
      p = json_skip_ws(p, sc->end);
      if (p >= sc->end || *p != '"') return 0;
      const u8 *key = p + 1;
      const u8 *after = json_skip_string(p, sc->end);
      if (!after) return 0;
      u32 key_len = (u32)(after - 1 - key);
      p = json_skip_ws(after, sc->end);
      if (p >= sc->end || *p != ':') return 0;
      i32 next = step >= 0 && (u32)step < sc->nsteps &&
                         step_matches(&sc->steps[step], key, key_len, -1)
                     ? step + 1
                     : -1;
      p = scan_value(sc, p + 1, next, depth + 1);
      if (!p) return 0;
      p = json_skip_ws(p, sc->end);
      if (p < sc->end && *p == ',') {
        p++;
        continue;
      }
      if (p < sc->end && *p == '}') return p + 1;
      return 0;
    }
  }
  if (c == '"') return json_skip_string(p, sc->end);
  if (c == 't') return sc->end - p >= 4 && memcmp(p, "true", 4) == 0 ? p + 4 : 0;
  if (c == 'f') return sc->end - p >= 5 && memcmp(p, "false", 5) == 0 ? p + 5 : 0;
  if (c == 'n') return sc->end - p >= 4 && memcmp(p, "null", 4) == 0 ? p + 4 : 0;
  double v;
  return json_number(p, sc->end, &v);
}

enum { SHOW_ORIGINAL, SHOW_ZERO, SHOW_FIXED };

/* One row's single score (regression, or a binary model's probability): noise and
 * rounding apply; top-k keeps it (k >= 1). A probability keeps its side of 0.5, so the
 * predicted class never changes; label-only gives that class (1.0 or 0.0), and for a
 * regression value (outside [0, 1]) the value rounded to an integer. */
static int write_single(const u8 *body, u32 at, const Hardening *h, u64 seed) {
  double v = nums[at], w = v;
  int probability = v >= 0 && v <= 1;
  int digits = h->round_digits >= 0 ? h->round_digits : 6;
  if (h->label_only) {
    w = probability ? (v >= 0.5 ? 1 : 0) : (double)(i64)(v < 0 ? v - 0.5 : v + 0.5);
    out.len += json_write_fixed((char *)out.p + out.len, w, 1);
    return 1;
  }
  if (h->noise > 0) {
    u64 state = seed;
    double u = (double)(splitmix(&state) >> 11) * (1.0 / 9007199254740992.0);
    w += h->noise * (2 * u - 1);
  }
  if (h->round_digits >= 0) {
    double unit = 1;
    for (int d = 0; d < digits; d++) unit /= 10;
    double scaled = w / unit;
    w = (double)(i64)(scaled < 0 ? scaled - 0.5 : scaled + 0.5) * unit;
  }
  if (probability) {
    if (w < 0) w = 0;
    if (w > 1) w = 1;
    /* the class is the side of 0.5: the hardened score stays on the model's side */
    if (v >= 0.5 && w < 0.5) w = 0.5;
    if (v < 0.5 && w >= 0.5) w = h->round_digits >= 0 && digits == 0 ? 0 : 0.5 - 1e-6;
  }
  if (h->noise <= 0 && h->round_digits < 0) {
    memcpy(out.p + out.len, body + num_start[at], num_end[at] - num_start[at]);
    out.len += num_end[at] - num_start[at];
  } else {
    out.len += json_write_fixed((char *)out.p + out.len, w, digits);
  }
  return 1;
}

/* Rewrites one row of scores into `out`, comma-separated (the caller writes brackets).
 * The top-1 class of the model is the top-1 class the client sees, whatever the settings:
 * noise and rounding never reorder it. */
static int write_row(const u8 *body, u32 first, u32 n, const Hardening *h, u64 seed) {
  if (!buf_reserve(&out, 2 + n * 42)) return 0;
  if (n == 1) return write_single(body, first, h, seed);
  double *v = nums + first;
  u32 top = 0;
  int probabilities = 1;
  for (u32 i = 0; i < n; i++) {
    if (v[i] > v[top]) top = i;
    if (v[i] < 0 || v[i] > 1) probabilities = 0;
  }
  if (h->label_only) {
    for (u32 i = 0; i < n; i++) {
      if (i) out.p[out.len++] = ',';
      memcpy(out.p + out.len, i == top ? "1.0" : "0.0", 3);
      out.len += 3;
    }
    return 1;
  }
  if (n > work_cap) {
    double *a = realloc(work, n * sizeof(double));
    if (a) work = a;
    u8 *b = realloc(show_buf, n);
    if (b) show_buf = b;
    u8 *c = realloc(keep_buf, n);
    if (c) keep_buf = c;
    if (!a || !b || !c) return 0;
    work_cap = n;
  }
  double *w = work;
  u8 *show = show_buf;
  for (u32 i = 0; i < n; i++) {
    w[i] = v[i];
    show[i] = SHOW_ORIGINAL;
  }
  if (h->noise > 0) {
    u64 state = seed;
    for (u32 i = 0; i < n; i++) {
      double u = (double)(splitmix(&state) >> 11) * (1.0 / 9007199254740992.0);
      w[i] += h->noise * (2 * u - 1);
      if (probabilities) w[i] = w[i] < 0 ? 0 : (w[i] > 1 ? 1 : w[i]);
      show[i] = SHOW_FIXED;
    }
    double gap = 1e-6;
    if (probabilities && w[top] < gap) w[top] = gap;
    for (u32 i = 0; i < n; i++)
      if (i != top && w[i] >= w[top]) w[i] = w[top] - gap;
    if (probabilities)
      for (u32 i = 0; i < n; i++)
        if (w[i] < 0) w[i] = 0;
  }
  if (h->top_k > 0 && (u32)h->top_k < n) {
    u8 *keep = keep_buf;
    memset(keep, 0, n);
    keep[top] = 1;
    for (i32 k = 1; k < h->top_k; k++) {
      i32 best = -1;
      for (u32 i = 0; i < n; i++)
        if (!keep[i] && (best < 0 || w[i] > w[best])) best = (i32)i;
      if (best >= 0) keep[best] = 1;
    }
    for (u32 i = 0; i < n; i++)
      if (!keep[i]) {
        w[i] = 0;
        show[i] = SHOW_ZERO;
      }
  }
  int digits = h->round_digits >= 0 ? h->round_digits : 6;
  if (h->round_digits >= 0) {
    double unit = 1;
    for (int d = 0; d < digits; d++) unit /= 10;
    for (u32 i = 0; i < n; i++) {
      if (show[i] == SHOW_ZERO) continue;
      double scaled = w[i] / unit;
      double r = (double)(i64)(scaled < 0 ? scaled - 0.5 : scaled + 0.5);
      w[i] = r * unit;
      show[i] = SHOW_FIXED;
    }
    if (probabilities && w[top] < unit) w[top] = unit;
    for (u32 i = 0; i < n; i++)
      if (i != top && w[i] >= w[top] - unit / 2) {
        w[i] = w[top] - unit;
        if (probabilities && w[i] < 0) w[i] = 0;
        if (show[i] == SHOW_ZERO && w[i] == 0) continue;
        show[i] = SHOW_FIXED;
      }
  }
  for (u32 i = 0; i < n; i++) {
    if (i) out.p[out.len++] = ',';
    if (show[i] == SHOW_ORIGINAL) {
      u32 s = num_start[first + i], e = num_end[first + i];
      memcpy(out.p + out.len, body + s, e - s);
      out.len += e - s;
    } else if (show[i] == SHOW_ZERO) {
      memcpy(out.p + out.len, "0.0", 3);
      out.len += 3;
    } else {
      out.len += json_write_fixed((char *)out.p + out.len, w[i], digits);
    }
  }
  return 1;
}

/* One target: a vector in brackets, a bare single score, or a tensor's flat data (rows of
 * `width` numbers, in one pair of brackets). */
static int write_target(const u8 *body, const Target *t, u32 width, const Hardening *h,
                        u64 seed) {
  if (t->kind == T_NUMBER) {
    if (!buf_reserve(&out, 42)) return 0;
    return write_single(body, t->first, h, seed);
  }
  u32 w = t->kind == T_FLAT ? width : t->count;
  if (w == 0 || t->count % w) return 0;
  if (!buf_reserve(&out, 1)) return 0;
  out.p[out.len++] = '[';
  for (u32 row = 0; row < t->count; row += w) {
    if (row) {
      if (!buf_reserve(&out, 1)) return 0;
      out.p[out.len++] = ',';
    }
    if (!write_row(body, t->first + row, w, h, seed + row * 0x9e3779b9ULL)) return 0;
  }
  if (!buf_reserve(&out, 1)) return 0;
  out.p[out.len++] = ']';
  return 1;
}

/* Returns 1 and leaves the rewritten body in `out`, or 0 (counted) to pass it unchanged. */
/* kserve: each output tensor's row width, prod(shape[1:]) (1 for shape [N]), in the order
 * the tensors come; 0 if none could be read. */
static u32 *widths;
static u32 nwidths, widths_cap;

static int read_widths(Root *r, const u8 *body, u32 len) {
  Scan sc = {body, body + len, r->shape_steps, r->nshape_steps, 0, 0, 0, 0, 0, 0, 0, 0};
  ntargets = 0;
  nnums = 0;
  nwidths = 0;
  if (!scan_value(&sc, body, 0, 0)) return 0;
  if (ntargets > widths_cap) {
    u32 *w = realloc(widths, ntargets * sizeof(u32));
    if (!w) return 0;
    widths = w;
    widths_cap = ntargets;
  }
  for (u32 i = 0; i < ntargets; i++) {
    double width = 1;
    for (u32 k = 1; k < targets[i].count; k++) width *= nums[targets[i].first + k];
    widths[nwidths++] = width >= 1 && width < 1e7 ? (u32)width : 0;
  }
  return nwidths > 0;
}

static int harden(Root *r, const Hardening *h, const u8 *body, u32 len) {
  if (r->response_kserve && !read_widths(r, body, len)) {
    metric(r, M_UNMATCHED, 1);
    return 0;
  }
  Scan sc = {body, body + len, r->steps, r->nsteps, 0, 0, 0, 0, 0, 0, 0, 0};
  sc.nested = r->response_kserve;
  ntargets = 0;
  nnums = 0;
  const u8 *p = scan_value(&sc, body, r->nsteps ? 0 : -1, 0);
  if (!p || json_skip_ws(p, sc.end) != sc.end) {
    metric(r, M_MALFORMED, 1);
    return 0;
  }
  if (ntargets == 0) {
    metric(r, M_UNMATCHED, 1);
    return 0;
  }
  out.len = 0;
  u64 seed = h->noise > 0 ? siphash(noise_key, body, len) : 0;
  u32 prev = 0;
  for (u32 i = 0; i < ntargets; i++) {
    Target *t = &targets[i];
    if (!buf_put(&out, body + prev, t->start - prev)) return 0;
    u32 width = t->kind == T_FLAT && t->leaf < nwidths ? widths[t->leaf] : 0;
    if (!write_target(body, t, width, h, seed + i)) {
      metric(r, M_UNMATCHED, 1);
      return 0;
    }
    prev = t->end;
  }
  if (!buf_put(&out, body + prev, len - prev)) return 0;
  metric(r, M_HARDENED, 1);
  return 1;
}

/* ---------------------------------------------------------------------------------------
 * proxy-wasm entry points
 */

EXPORT(proxy_abi_version_0_2_1) void proxy_abi_version_0_2_1(void) {}

EXPORT(proxy_on_vm_start) u32 proxy_on_vm_start(u32 root_id, u32 size) {
  (void)root_id;
  (void)size;
  /* Not in the config: nobody who can read the sidecar's config dump learns the key. */
  if (wasi_random_get((u8 *)noise_key, sizeof(noise_key)) != 0) {
    noise_key[0] = now_ms() * 0x9e3779b97f4a7c15ULL;
    noise_key[1] = ~noise_key[0];
  }
  return 1;
}

EXPORT(proxy_on_context_create) void proxy_on_context_create(u32 id, u32 parent) {
  if (parent == 0) {
    Root *r = malloc(sizeof(Root));
    if (!r) return;
    memset(r, 0, sizeof(Root));
    r->id = id;
    r->next = roots;
    roots = r;
    return;
  }
  Root *root = find_root(parent);
  if (!root) return;
  Stream *s = malloc(sizeof(Stream));
  if (!s) return;
  memset(s, 0, sizeof(Stream));
  s->id = id;
  s->root = root;
  s->next = streams[id % STREAM_BUCKETS];
  streams[id % STREAM_BUCKETS] = s;
}

EXPORT(proxy_on_configure) u32 proxy_on_configure(u32 root_id, u32 size) {
  Root *r = find_root(root_id);
  if (!r) return 0;
  u8 *data = 0;
  usize len = 0;
  if (proxy_get_buffer_bytes(BUF_PLUGIN_CONFIGURATION, 0, size, &data, &len) != WASM_OK) {
    log_msg(LOG_ERROR, "modelguard: no plugin configuration");
    return 0;
  }
  int ok = configure(r, (const char *)data, (u32)len);
  /* The tree points into the buffer: keep it for the root's lifetime. */
  if (!ok) free(data);
  return (u32)ok;
}

/* ---------------------------------------------------------------------------------------
 * Request limits: checked on the whole request before the model sees any of it
 */

static u32 fmt_u32(char *out, u32 n) {
  char tmp[12];
  u32 k = 0;
  do {
    tmp[k++] = (char)('0' + n % 10);
    n /= 10;
  } while (n);
  for (u32 i = 0; i < k; i++) out[i] = tmp[k - 1 - i];
  return k;
}

/* Answers the request itself with `status` and a JSON reason; the stream is not fed (the
 * model never answered it). */
static void refuse(Stream *s, u32 status, const char *error, const char *what, u32 limit) {
  static const u8 HEADERS[] = "\x01\0\0\0\x0c\0\0\0\x10\0\0\0content-type\0application/json";
  char body[256];
  u32 k = 0;
  const char *parts[] = {"{\"error\":\"", error, "\",\"reason\":\"", what, " (limit "};
  for (u32 i = 0; i < 5; i++) {
    usize n = cstrlen(parts[i]);
    memcpy(body + k, parts[i], n);
    k += (u32)n;
  }
  k += fmt_u32(body + k, limit);
  memcpy(body + k, ")\"}", 3);
  k += 3;
  s->refused = 1;
  s->done = 1;
  s->inspect = 0;
  proxy_send_local_response(status, error, cstrlen(error), body, k, HEADERS, sizeof(HEADERS),
                            -1);
}

/* A body in UTF-16 or UTF-32 (which the model's JSON reader may well accept: Python's
 * json.loads does), seen as the ASCII its code units spell: every unit under 128 becomes
 * its byte, any other one 'x' (valid JSON has those only inside strings). Scanned bytewise
 * instead, a wide character whose low byte is a quote or a backslash would desynchronise
 * the string tracking and hide brackets from the depth check, and no row would be
 * counted. The encoding is detected as json.loads does it (BOM, else where the NULs are).
 * Returns a new buffer (caller frees it), or NULL for UTF-8 (the body is scanned as is). */
static u8 *narrow(const u8 *b, usize n, usize *out_len) {
  u32 unit = 0, big = 0, skip = 0;
  if (n >= 4 && b[0] == 0xFF && b[1] == 0xFE && b[2] == 0 && b[3] == 0) {
    unit = 4, skip = 4;
  } else if (n >= 4 && b[0] == 0 && b[1] == 0 && b[2] == 0xFE && b[3] == 0xFF) {
    unit = 4, big = 1, skip = 4;
  } else if (n >= 2 && b[0] == 0xFF && b[1] == 0xFE) {
    unit = 2, skip = 2;
  } else if (n >= 2 && b[0] == 0xFE && b[1] == 0xFF) {
    unit = 2, big = 1, skip = 2;
  } else if (n >= 4 && b[0] == 0 && b[1] == 0) {
    unit = 4, big = 1;
  } else if (n >= 4 && b[1] == 0 && b[2] == 0 && b[3] == 0) {
    unit = 4;
  } else if (n >= 2 && b[0] == 0) {
    unit = 2, big = 1;
  } else if (n >= 2 && b[1] == 0) {
    unit = 2;
  }
  if (!unit) return 0;
  usize count = (n - skip) / unit;
  u8 *out = malloc(count ? count : 1);
  if (!out) return 0;
  for (usize i = 0; i < count; i++) {
    const u8 *u = b + skip + i * unit;
    u32 v = 0;
    for (u32 k = 0; k < unit; k++) v = big ? (v << 8) | u[k] : v | (u32)u[k] << (8 * k);
    out[i] = v < 128 ? (u8)v : 'x';
  }
  *out_len = count;
  return out;
}

/* Rows in a request: the values at request.features (kserve: the tensors' shape[0]). What
 * a scan that fails part-way counted still counts: a limit errs on the refusing side. */
static u64 count_instances(Root *r, const u8 *body, u32 len, const u32 *close_at) {
  Scan sc = {body, body + len, r->inst_steps, r->ninst_steps, 0, 0, 0, 0, 0, 0, 0, close_at};
  sc.count_mode = 1;
  sc.count_value = r->inst_value;
  scan_value(&sc, body, 0, 0);
  return sc.counted;
}

/* The bytes check_body acts on; every other byte (digits, spaces, letters: nearly all of a
 * body) is passed over with one table load instead of a compare per kind of bracket
 * (natively 6.1k -> 3.8k instructions for the 354 bytes of a digits query). */
static const u8 JSON_MARK[256] = {['"'] = 1, ['['] = 1, [']'] = 1, ['{'] = 1, ['}'] = 1, [','] = 1};

/* The request body's depth check and the count a budget charges, in one pass over the
 * body instead of two (each byte pass is a few thousand instructions per request).
 *
 * Depth (`max`, 0 = unchecked): JSON nested deeper than `max` (strings skipped) returns 1
 * at once; no recursion, so a body of 100k brackets costs a loop, not a stack.
 *
 * Rows (`rows` non-NULL, cost: instances), as the Lua counter it replaces did: the length
 * of the longest array that is the body itself or the value of one of its top-level
 * members ({"instances": [...]} and [[...], ...] alike), whatever the member is called, so
 * neither a spelling of the key (escapes) nor a duplicate key can hide rows from it;
 * brackets and commas inside strings do not count. Independent of request.features on
 * purpose: a budget is charged the same with or without a feature path, and whichever
 * member the model reads. The count stops at an unmatched closing bracket or an unclosed
 * string (what it has so far is the count); the depth check goes on to the end.
 *
 * Brackets (`close_at` non-NULL, n slots): for the row count at request.features, each
 * container's closing offset at its opening offset (the slots double as the stack of open
 * ones), so count_instances jumps over a row instead of scanning it again. Valid only if
 * `*matched` comes back 1: every string closed and free of control characters, every
 * bracket matched, so that JSON's own skipping (skip_value) would find the same ends. */
static int check_body(const u8 *p, usize n, u32 max, u64 *rows, u32 *close_at, int *matched) {
  u64 best = 0, count[3] = {0, 0, 0};
  u8 counting[3] = {0, 0, 0}, outer = 0, on = rows != 0, clean = 1;
  u32 depth = 0, top = 0xffffffffU;
  if (matched) *matched = 0;
  if (!max && !on && !close_at) return 0;
  for (usize i = 0; i < n; i++) {
    u8 c = p[i];
    if (!JSON_MARK[c]) continue;
    if (c == '"') {
      for (i++; i < n && p[i] != '"'; i++) {
        if (p[i] == '\\') i++;
        else if (p[i] < 0x20) clean = 0;
      }
      if (i >= n) clean = 0;
    } else if (c == '[' || c == '{') {
      depth++;
      if (max && depth > max) return 1;
      if (close_at) {
        close_at[i] = top;
        top = (u32)i;
      }
      if (on) {
        if (depth == 1) outer = c;
        if (depth <= 2) {
          counting[depth] = c == '[' && (depth == 1 || outer == '{');
          if (counting[depth]) {
            usize j = i + 1;
            while (j < n && (p[j] == ' ' || (p[j] >= '\t' && p[j] <= '\r'))) j++;
            count[depth] = j < n && p[j] == ']' ? 0 : 1;
          }
        }
      }
    } else if (c == ']' || c == '}') {
      if (depth == 0) {
        clean = 0;
        if (!max && !close_at) break;
        on = 0;
        continue;
      }
      if (on && depth <= 2 && counting[depth] && count[depth] > best) best = count[depth];
      depth--;
      if (close_at) {
        u32 open = top;
        top = close_at[open];
        close_at[open] = (u32)i;
      }
    } else if (c == ',' && on && depth && depth <= 2 && counting[depth]) {
      count[depth]++;
    }
  }
  if (rows) *rows = best;
  if (matched) *matched = clean && depth == 0;
  return 0;
}

/* What a request of `n` rows is charged as: exact up to 8, then m * 2^k with m in 5..8 (at
 * most 25% over the count, exact at 2^k), so a client has few quota buckets. Written only
 * above 1 row: a request without the header is charged 1 (the quota filter's bucket for
 * it is the constant 1, which saves Envoy building an entry from the header, and this
 * filter a host call, on nearly every request). The connection manager drops any
 * x-modelguard-* header a caller sent wherever a budget charges instances. */
static void set_class(const Root *r, u64 n) {
  if (n <= 1) return;
  u64 c = n;
  if (c > 8) {
    u64 step = 2;
    while (c > 8 * step) step *= 2;
    c = (c + step - 1) / step * step;
  }
  char digits[24];
  u32 k = 0;
  char tmp[24];
  do {
    tmp[k++] = (char)('0' + c % 10);
    c /= 10;
  } while (c);
  for (u32 i = 0; i < k; i++) digits[i] = tmp[k - 1 - i];
  proxy_replace_header_map_value(MAP_REQUEST_HEADERS, r->class_header, r->class_header_len,
                                 digits, k);
}

EXPORT(proxy_on_request_headers) u32 proxy_on_request_headers(u32 id, u32 n, u32 eos) {
  (void)n;
  Stream *s = find_stream(id);
  if (!s || !s->root->configured) return HEADERS_CONTINUE;
  Root *r = s->root;
  s->hardening = &r->dflt;
  /* Only what this configuration uses: the tier, and the client key and path for the feed. */
  Want want[4];
  u32 nwant = 0, tier = 4, key = 4, path = 4, length = 4;
  if (r->tier_header) {
    tier = nwant;
    want[nwant++] = (Want){r->tier_header, r->tier_header_len, 0, 0, 0};
  }
  if (r->feed && r->key_kind == KEY_HEADER) {
    key = nwant;
    want[nwant++] = (Want){r->key_header, r->key_header_len, 0, 0, 0};
  }
  if (r->feed) {
    path = nwant;
    want[nwant++] = (Want){":path", 5, 0, 0, 0};
  }
  /* The declared size, when other headers are read anyway (one call reads them all): a
   * large upload is then refused before any of it is sent. Otherwise the body's own size
   * refuses it (Envoy reports it chunk by chunk, without a copy into the VM); a host call
   * for this header alone would cost as much as the rest of the request's checks. */
  if (r->max_request && !eos && nwant > 0) {
    length = nwant;
    want[nwant++] = (Want){"content-length", 14, 0, 0, 0};
  }
  /* Kept for the stream's life: the key and path point into it. */
  s->headers = read_headers(MAP_REQUEST_HEADERS, want, nwant);
  if (length < 4 && want[length].found &&
      parse_uint(want[length].value, want[length].value_len) > r->max_request) {
    metric(r, M_REFUSED_SIZE, 1);
    refuse(s, 413, "request_too_large", "request body over request.maxBytes", r->max_request);
    return HEADERS_STOP;
  }
  if (tier < 4 && want[tier].found) {
    for (u32 i = 0; i < r->ntiers; i++)
      if (cstrlen(r->tier_names[i]) == want[tier].value_len &&
          memcmp(r->tier_names[i], want[tier].value, want[tier].value_len) == 0)
        s->hardening = &r->tiers[i];
  }
  s->has_body = !eos;
  /* A request without a body is charged 1: no class header (set_class). */
  /* With limits or a class to set, the request waits here until its body is checked. */
  u32 verdict = (r->max_request || r->class_header) && !eos ? HEADERS_STOP : HEADERS_CONTINUE;
  if (!r->feed) return verdict;
  if (key < 4 && want[key].found) {
    s->key = want[key].value;
    s->key_len = want[key].value_len;
  } else if (r->key_kind == KEY_SOURCE_IP) {
    if (proxy_get_property("source\0address", 14, &s->key_buf, &s->key_len) == WASM_OK &&
        s->key_buf) {
      /* "ip:port" or "[v6]:port": the client is the address, not the connection. */
      u8 *k = s->key_buf;
      usize i = s->key_len;
      while (i > 0 && k[i - 1] != ':') i--;
      if (i > 0) s->key_len = i - 1;
      if (s->key_len > 1 && k[0] == '[') {
        memmove(k, k + 1, s->key_len - 2);
        s->key_len -= 2;
      }
    }
    s->key = s->key_buf;
  } else if (r->key_kind == KEY_IDENTITY) {
    proxy_get_property("connection\0uri_san_peer_certificate", 35, &s->key_buf, &s->key_len);
    s->key = s->key_buf;
  }
  if (!s->key) s->key_len = 0;
  /* Overrides come with the feed (the risk estimate is computed from it): its key is here. */
  if (r->nover && s->key)
    apply_override(s, tier < 4 && want[tier].found ? want[tier].value : 0,
                   tier < 4 && want[tier].found ? want[tier].value_len : 0);
  if (path < 4 && want[path].found) {
    s->path = want[path].value;
    s->path_len = want[path].value_len;
  }
  return verdict;
}

/* The whole request body, held until it is complete, then checked: size, depth, rows. */
static u32 check_request(Stream *s, u32 size, u32 eos) {
  Root *r = s->root;
  if (r->max_request && size > r->max_request) {
    metric(r, M_REFUSED_SIZE, 1);
    refuse(s, 413, "request_too_large", "request body over request.maxBytes", r->max_request);
    return DATA_STOP_AND_BUFFER;
  }
  if (!eos) return DATA_STOP_AND_BUFFER;
  if (size == 0) return DATA_CONTINUE; /* charged 1: no class header */
  u8 *body = 0;
  usize len = 0;
  if (proxy_get_buffer_bytes(BUF_REQUEST_BODY, 0, size, &body, &len) != WASM_OK || !body) {
    /* Unreadable (never seen): charged as if every byte were a row, as the Lua did. */
    if (r->class_header) set_class(r, size);
    return DATA_CONTINUE;
  }
  /* A UTF-8 body (nearly all) is checked in place; a wider one through its ASCII view. */
  usize view_len = len;
  u8 *wide = narrow(body, len, &view_len);
  const u8 *view = wide ? wide : body;
  if (!wide && len >= 3 && body[0] == 0xEF && body[1] == 0xBB && body[2] == 0xBF) {
    view += 3; /* a UTF-8 byte-order mark, which json.loads skips too */
    view_len -= 3;
  }
  u64 rows = 0;
  int count = r->ninst_steps && (r->feed || r->max_instances), matched = 0;
  /* The brackets' table for the row count: 4 bytes a body byte, so only up to 64 KiB (the
   * feed's default body limit); a larger body's rows are scanned again, as before. */
  u32 *close_at = count && view_len <= 64 * 1024 ? malloc(view_len * 4 + 4) : 0;
  if (check_body(view, view_len, r->max_depth, r->class_header ? &rows : 0, close_at,
                 &matched)) {
    free(close_at);
    free(wide);
    free(body);
    metric(r, M_REFUSED_DEPTH, 1);
    refuse(s, 400, "request_too_deep", "JSON nested deeper than request.maxDepth",
           r->max_depth);
    return DATA_STOP_AND_BUFFER;
  }
  if (count) {
    u64 n = count_instances(r, view, (u32)view_len, matched ? close_at : 0);
    free(close_at);
    s->instances = n > 0xffffffffULL ? 0xffffffffU : (u32)n;
    if (r->max_instances && n > r->max_instances) {
      free(wide);
      free(body);
      metric(r, M_REFUSED_INSTANCES, 1);
      refuse(s, 413, "too_many_instances", "rows over request.maxInstances", r->max_instances);
      return DATA_STOP_AND_BUFFER;
    }
  }
  if (r->class_header) set_class(r, rows);
  free(wide);
  if (r->feed && len <= r->feed_max_body) {
    buf_free(&s->request);
    s->request.p = body; /* kept for the feed as it came, not copied */
    s->request.len = s->request.cap = (u32)len;
  } else {
    s->request_too_large = r->feed;
    free(body);
  }
  return DATA_CONTINUE;
}

EXPORT(proxy_on_request_body) u32 proxy_on_request_body(u32 id, u32 size, u32 eos) {
  Stream *s = find_stream(id);
  if (!s || !s->root->configured) return DATA_CONTINUE;
  if (s->refused) return DATA_STOP_AND_BUFFER;
  if (eos) s->body_complete = 1;
  if (s->root->max_request || s->root->class_header) return check_request(s, size, eos);
  if (!s->root->feed) return DATA_CONTINUE;
  if (s->request_too_large || size == 0) return DATA_CONTINUE;
  if (s->request.len + size > s->root->feed_max_body) {
    s->request_too_large = 1;
    buf_free(&s->request);
    return DATA_CONTINUE;
  }
  /* Read as it streams past: the model never waits for the feed. */
  u8 *chunk = 0;
  usize len = 0;
  if (proxy_get_buffer_bytes(BUF_REQUEST_BODY, 0, size, &chunk, &len) == WASM_OK && chunk) {
    if (!s->request.p) { /* the usual single chunk: kept as it came, not copied */
      s->request.p = chunk;
      s->request.len = s->request.cap = (u32)len;
      return DATA_CONTINUE;
    }
    buf_put(&s->request, chunk, (u32)len);
  }
  free(chunk);
  return DATA_CONTINUE;
}

/* Trailers end a body too (HTTP/2, or HTTP/1 with trailers enabled): what was held is
 * checked now, or it would go on to the model unchecked and, behind a budget of
 * instances, without its class. */
EXPORT(proxy_on_request_trailers) u32 proxy_on_request_trailers(u32 id, u32 n) {
  (void)n;
  Stream *s = find_stream(id);
  if (!s || !s->root->configured) return TRAILERS_CONTINUE;
  if (s->refused) return TRAILERS_STOP;
  Root *r = s->root;
  if (!(r->max_request || r->class_header) || s->body_complete) return TRAILERS_CONTINUE;
  s->body_complete = 1;
  usize size = 0;
  u32 flags = 0;
  if (proxy_get_buffer_status(BUF_REQUEST_BODY, &size, &flags) != WASM_OK) size = 0;
  return check_request(s, (u32)size, 1) == DATA_CONTINUE ? TRAILERS_CONTINUE : TRAILERS_STOP;
}

/* Whether the model gave this answer (Envoy's response code details): the filter sits
 * before the quota and rate limit filters (it sets a budget's instance class for them),
 * so their refusals, and the router's own when no model is there, pass it on the way out,
 * for queries the model never saw. Asked only of error answers (one host call). */
static int from_model(void) {
  u8 *details = 0;
  usize len = 0;
  if (proxy_get_property("response\0code_details", 21, &details, &len) != WASM_OK || !details)
    return 1;
  int model = (len == 12 && memcmp(details, "via_upstream", 12) == 0) ||
              (len >= 9 && memcmp(details, "upstream_", 9) == 0);
  free(details);
  return model;
}

EXPORT(proxy_on_response_headers) u32 proxy_on_response_headers(u32 id, u32 n, u32 eos) {
  (void)n;
  Stream *s = find_stream(id);
  if (!s || !s->root->configured || s->refused) return HEADERS_CONTINUE;
  Root *r = s->root;
  int hardening = s->hardening && s->hardening->active;
  int feeding = r->feed && s->has_body;
  if (!hardening && !feeding) return HEADERS_CONTINUE;
  Want want[3] = {{":status", 7, 0, 0, 0},
                  {"content-type", 12, 0, 0, 0},
                  {"content-length", 14, 0, 0, 0}};
  /* Without a body only the status is needed. */
  u8 *headers = read_headers(MAP_RESPONSE_HEADERS, want, eos ? 1 : 3);
  if (want[0].found) s->status = (u32)parse_uint(want[0].value, want[0].value_len);
  if (s->status >= 400 && !from_model()) {
    free(headers);
    s->done = 1; /* not answered: neither fed nor counted as unobserved */
    return HEADERS_CONTINUE;
  }
  int inspect = 0;
  if (!eos) {
    if (!want[1].found || !contains_json(want[1].value, want[1].value_len)) {
      if (hardening) metric(r, M_NOT_JSON, 1);
    } else if (want[2].found && parse_uint(want[2].value, want[2].value_len) > r->max_body) {
      if (hardening && r->deny_unhardenable) {
        free(headers);
        metric(r, M_DENIED_UNHARDENABLE, 1);
        s->done = 0; /* the query was answered by the model: still fed (without the answer) */
        refuse(s, 502, "answer_unhardenable", "answer too large to harden", r->max_body);
        s->done = 0;
        return HEADERS_STOP;
      }
      if (hardening) metric(r, M_TOO_LARGE, 1);
    } else {
      inspect = 1;
    }
  }
  free(headers);
  if (!inspect) return HEADERS_CONTINUE;
  s->inspect = 1;
  /* Held until the body is rewritten, so content-length can still be corrected. */
  return HEADERS_STOP;
}

/* Tells the access log which hardening changed this answer: the tier's name, or "default".
 * Envoy keeps a property a plugin sets as filter state "wasm.<path>", which the access log
 * reads with %FILTER_STATE(wasm.modelguard.hardened:PLAIN)%; the proxy-wasm ABI has no call
 * that writes dynamic metadata. One host call, only for an answer actually rewritten. */
static void mark_hardened(const Stream *s) {
  const Root *r = s->root;
  const char *name = "default";
  if (s->hardening != &r->dflt) name = r->tier_names[s->hardening - r->tiers];
  proxy_set_property("modelguard.hardened", 19, name, cstrlen(name));
}

EXPORT(proxy_on_response_body) u32 proxy_on_response_body(u32 id, u32 size, u32 eos) {
  Stream *s = find_stream(id);
  if (!s || !s->inspect || s->refused) return DATA_CONTINUE;
  Root *r = s->root;
  int hardening = s->hardening && s->hardening->active;
  if (!eos) {
    if (size <= r->max_body) return DATA_STOP_AND_BUFFER;
    if (hardening && r->deny_unhardenable) {
      /* Held so far, so nothing of it has left: the client gets a refusal instead. */
      metric(r, M_DENIED_UNHARDENABLE, 1);
      refuse(s, 502, "answer_unhardenable", "answer too large to harden", r->max_body);
      s->done = 0;
      return DATA_STOP_AND_BUFFER;
    }
    /* Too large to rewrite: released unchanged (Envoy's own buffer limit stays clear). */
    s->inspect = 0;
    if (hardening) metric(r, M_TOO_LARGE, 1);
    return DATA_CONTINUE;
  }
  s->inspect = 0;
  u8 *body = 0;
  usize len = 0;
  if (proxy_get_buffer_bytes(BUF_RESPONSE_BODY, 0, size, &body, &len) != WASM_OK) {
    if (hardening) metric(r, M_MALFORMED, 1);
    return DATA_CONTINUE;
  }
  if (r->feed && s->has_body) feed_query(s, body, (u32)len);
  if (hardening && harden(r, s->hardening, body, (u32)len)) {
    proxy_set_buffer_bytes(BUF_RESPONSE_BODY, 0, (u32)len, out.p, out.len);
    char digits[12];
    u32 k = fmt_u32(digits, out.len);
    proxy_replace_header_map_value(MAP_RESPONSE_HEADERS, "content-length", 14, digits, k);
    mark_hardened(s);
  }
  free(body);
  return DATA_CONTINUE;
}

EXPORT(proxy_on_log) void proxy_on_log(u32 id) {
  Stream *s = find_stream(id);
  if (!s || !s->root->feed || !s->has_body || s->done) return;
  /* No JSON answer was buffered (error, other type, or too large): the query still counts. */
  feed_query(s, (const u8 *)"", 0);
}

EXPORT(proxy_on_tick) void proxy_on_tick(u32 root_id) {
  Root *r = find_root(root_id);
  if (r) flush(r);
}

EXPORT(proxy_on_done) u32 proxy_on_done(u32 id) {
  Root *r = find_root(id);
  if (!r) return 1;
  /* A config swap retires this root: ship what it holds, finish once calls return. */
  flush(r);
  if (r->in_flight == 0) return 1;
  r->done_pending = 1;
  return 0;
}

static void delete_stream(u32 id) {
  for (Stream **p = &streams[id % STREAM_BUCKETS]; *p; p = &(*p)->next)
    if ((*p)->id == id) {
      Stream *s = *p;
      *p = s->next;
      free(s->headers);
      free(s->key_buf);
      buf_free(&s->request);
      free(s);
      return;
    }
}

EXPORT(proxy_on_delete) void proxy_on_delete(u32 id) {
  for (Root **p = &roots; *p; p = &(*p)->next)
    if ((*p)->id == id) {
      Root *r = *p;
      *p = r->next;
      for (Call *c = calls; c; c = c->next)
        if (c->root == r) c->root = 0;
      free_root_config(r);
      buf_free(&r->batch);
      counts_free(&r->batch_clients);
      counts_free(&r->unobserved);
      free(r);
      return;
    }
  delete_stream(id);
}

EXPORT(proxy_on_grpc_receive_initial_metadata)
void proxy_on_grpc_receive_initial_metadata(u32 id, u32 token, u32 headers) {
  (void)id, (void)token, (void)headers;
}

EXPORT(proxy_on_grpc_receive_trailing_metadata)
void proxy_on_grpc_receive_trailing_metadata(u32 id, u32 token, u32 trailers) {
  (void)id, (void)token, (void)trailers;
}


/* A unary call ends in exactly one of proxy_on_grpc_receive (success) and
 * proxy_on_grpc_close (failure, with its status). */
static void call_done(u32 token, u32 status) {
  Call *c = call_take(token);
  if (!c) return;
  Root *r = c->root;
  if (r) {
    r->in_flight--;
    if (status != 0) {
      /* The batch is lost: charge each of its clients, so the gap is reported. */
      metric(r, M_FEED_CALL_FAILURES, 1);
      for (u32 i = 0; i < c->clients.n; i++)
        unobserved(r, (const u8 *)c->clients.items[i].key, c->clients.items[i].len,
                   R_CALL_FAILED, c->clients.items[i].count, c->clients.items[i].instances);
    }
    if (r->done_pending && r->in_flight == 0) proxy_done();
  }
  counts_free(&c->clients);
  free(c);
}

EXPORT(proxy_on_grpc_receive) void proxy_on_grpc_receive(u32 id, u32 token, u32 size) {
  (void)id, (void)size;
  call_done(token, 0);
}

EXPORT(proxy_on_grpc_close) void proxy_on_grpc_close(u32 id, u32 token, u32 status) {
  (void)id;
  /* 0 here would be a stream closing cleanly; for a call it still means no answer came. */
  call_done(token, status ? status : 2);
}
