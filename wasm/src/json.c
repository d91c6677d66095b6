#include "json.h"

#define MAX_DEPTH 64

usize cstrlen(const char *s) {
  usize n = 0;
  while (s[n]) n++;
  return n;
}

const u8 *json_skip_ws(const u8 *p, const u8 *end) {
  while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) p++;
  return p;
}

const u8 *json_skip_string(const u8 *p, const u8 *end) {
  p++; /* opening quote */
  while (p < end) {
    u8 c = *p;
    if (c == '"') return p + 1;
    if (c == '\\') {
      p += 2;
      continue;
    }
    if (c < 0x20) return 0;
    p++;
  }
  return 0;
}

static const double POW10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                               1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                               1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

static double scale10(double v, int e) {
  while (e > 22) {
    v *= 1e22;
    e -= 22;
  }
  while (e < -22) {
    v /= 1e22;
    e += 22;
  }
  return e >= 0 ? v * POW10[e] : v / POW10[-e];
}

const u8 *json_number(const u8 *p, const u8 *end, double *out) {
  int neg = 0;
  if (p < end && *p == '-') {
    neg = 1;
    p++;
  }
  if (p >= end || *p < '0' || *p > '9') return 0;
  u64 mantissa = 0;
  int exp10 = 0, digits = 0;
  if (*p == '0') {
    p++;
  } else {
    while (p < end && *p >= '0' && *p <= '9') {
      if (digits < 19) {
        mantissa = mantissa * 10 + (u64)(*p - '0');
        digits++;
      } else {
        exp10++;
      }
      p++;
    }
  }
  if (p < end && *p == '.') {
    p++;
    if (p >= end || *p < '0' || *p > '9') return 0;
    while (p < end && *p >= '0' && *p <= '9') {
      if (digits < 19) {
        if (mantissa || *p != '0') digits++;
        mantissa = mantissa * 10 + (u64)(*p - '0');
        exp10--;
      }
      p++;
    }
  }
  if (p < end && (*p == 'e' || *p == 'E')) {
    p++;
    int eneg = 0, e = 0;
    if (p < end && (*p == '+' || *p == '-')) eneg = *p++ == '-';
    if (p >= end || *p < '0' || *p > '9') return 0;
    while (p < end && *p >= '0' && *p <= '9') {
      if (e < 10000) e = e * 10 + (*p - '0');
      p++;
    }
    exp10 += eneg ? -e : e;
  }
  double v = scale10((double)mantissa, exp10);
  *out = neg ? -v : v;
  return p;
}

u32 json_write_fixed(char *out, double v, int digits) {
  char *o = out;
  if (v != v) v = 0; /* NaN never reaches a client */
  if (v < 0) {
    *o++ = '-';
    v = -v;
  }
  while (digits > 0 && v * POW10[digits] >= 9e15) digits--;
  if (v >= 9e15) v = 9e15;
  u64 scaled = (u64)(v * POW10[digits] + 0.5);
  u64 unit = (u64)POW10[digits];
  u64 whole = scaled / unit, frac = scaled % unit;
  char tmp[24];
  int n = 0;
  do {
    tmp[n++] = (char)('0' + whole % 10);
    whole /= 10;
  } while (whole);
  while (n) *o++ = tmp[--n];
  *o++ = '.';
  if (digits == 0) {
    *o++ = '0';
  } else {
    char fr[16];
    for (int i = digits - 1; i >= 0; i--) {
      fr[i] = (char)('0' + frac % 10);
      frac /= 10;
    }
    int last = digits - 1;
    while (last > 0 && fr[last] == '0') last--;
    for (int i = 0; i <= last; i++) *o++ = fr[i];
  }
  if (out[0] == '-' && o - out == 4 && out[1] == '0' && out[3] == '0') { /* "-0.0" */
    memmove(out, out + 1, 3);
    o--;
  }
  return (u32)(o - out);
}

/* --- the configuration tree --------------------------------------------------------- */

typedef struct {
  const u8 *p, *end;
} Reader;

static JNode *node_new(u8 type) {
  JNode *n = malloc(sizeof(JNode));
  if (n) memset(n, 0, sizeof(JNode));
  if (n) n->type = type;
  return n;
}

void json_free(JNode *node) {
  while (node) {
    JNode *next = node->next;
    json_free(node->child);
    free(node);
    node = next;
  }
}

static int literal(Reader *r, const char *word) {
  usize n = cstrlen(word);
  if ((usize)(r->end - r->p) < n || memcmp(r->p, word, n) != 0) return 0;
  r->p += n;
  return 1;
}

static JNode *parse_value(Reader *r, int depth);

static int parse_string_span(Reader *r, const char **s, u32 *len) {
  const u8 *start = r->p + 1;
  const u8 *after = json_skip_string(r->p, r->end);
  if (!after) return 0;
  *s = (const char *)start;
  *len = (u32)(after - 1 - start);
  r->p = after;
  return 1;
}

static JNode *parse_container(Reader *r, int depth, int object) {
  JNode *node = node_new(object ? J_OBJECT : J_ARRAY);
  if (!node) return 0;
  JNode **tail = &node->child;
  r->p++;
  r->p = json_skip_ws(r->p, r->end);
  if (r->p < r->end && *r->p == (object ? '}' : ']')) {
    r->p++;
    return node;
  }
  for (;;) {
    const char *key = 0;
    u32 key_len = 0;
    r->p = json_skip_ws(r->p, r->end);
    if (object) {
      if (r->p >= r->end || *r->p != '"' || !parse_string_span(r, &key, &key_len)) break;
      r->p = json_skip_ws(r->p, r->end);
      if (r->p >= r->end || *r->p != ':') break;
      r->p++;
    }
    JNode *child = parse_value(r, depth + 1);
    if (!child) break;
    child->key = key;
    child->key_len = key_len;
    *tail = child;
    tail = &child->next;
    r->p = json_skip_ws(r->p, r->end);
    if (r->p < r->end && *r->p == ',') {
      r->p++;
      continue;
    }
    if (r->p < r->end && *r->p == (object ? '}' : ']')) {
      r->p++;
      return node;
    }
    break;
  }
  json_free(node);
  return 0;
}

static JNode *parse_value(Reader *r, int depth) {
  if (depth > MAX_DEPTH) return 0;
  r->p = json_skip_ws(r->p, r->end);
  if (r->p >= r->end) return 0;
  JNode *n;
  switch (*r->p) {
    case '{':
      return parse_container(r, depth, 1);
    case '[':
      return parse_container(r, depth, 0);
    case '"':
      n = node_new(J_STRING);
      if (n && !parse_string_span(r, &n->str, &n->str_len)) {
        free(n);
        return 0;
      }
      return n;
    case 't':
    case 'f':
      n = node_new(J_BOOL);
      if (!n) return 0;
      n->boolean = *r->p == 't';
      if (!literal(r, n->boolean ? "true" : "false")) {
        free(n);
        return 0;
      }
      return n;
    case 'n':
      if (!literal(r, "null")) return 0;
      return node_new(J_NULL);
    default: {
      double v;
      const u8 *after = json_number(r->p, r->end, &v);
      if (!after) return 0;
      n = node_new(J_NUMBER);
      if (!n) return 0;
      n->number = v;
      r->p = after;
      return n;
    }
  }
}

JNode *json_parse(const char *text, u32 len) {
  Reader r = {(const u8 *)text, (const u8 *)text + len};
  JNode *root = parse_value(&r, 0);
  if (root && json_skip_ws(r.p, r.end) != r.end) {
    json_free(root);
    return 0;
  }
  return root;
}

JNode *json_get(const JNode *object, const char *key) {
  if (!object || object->type != J_OBJECT) return 0;
  usize n = cstrlen(key);
  for (JNode *c = object->child; c; c = c->next)
    if (c->key_len == n && memcmp(c->key, key, n) == 0) return c;
  return 0;
}

int json_is(const JNode *node, const char *s) {
  usize n = cstrlen(s);
  return node && node->type == J_STRING && node->str_len == n && memcmp(node->str, s, n) == 0;
}
