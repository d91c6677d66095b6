/* Lean JSON: a small tree for the filter's configuration (parsed once per config), and a
 * number reader/writer for the hot path (no tree, no copies of the body). */
#ifndef MODELGUARD_JSON_H
#define MODELGUARD_JSON_H
#include "abi.h"

enum { J_NULL, J_BOOL, J_NUMBER, J_STRING, J_ARRAY, J_OBJECT };

typedef struct JNode {
  u8 type;
  u8 boolean;
  double number;
  const char *str; /* raw bytes between the quotes (escapes not decoded) */
  u32 str_len;
  const char *key; /* member name when inside an object */
  u32 key_len;
  struct JNode *child; /* first element or member */
  struct JNode *next;  /* next sibling */
} JNode;

/* Parses a whole document; NULL on any syntax error. Nodes point into `text`. */
JNode *json_parse(const char *text, u32 len);
void json_free(JNode *node);
JNode *json_get(const JNode *object, const char *key);
int json_is(const JNode *node, const char *s); /* a string node equal to s */

/* Reads a JSON number at p; returns the first byte after it, or NULL if none is there. */
const u8 *json_number(const u8 *p, const u8 *end, double *out);
const u8 *json_skip_ws(const u8 *p, const u8 *end);
/* Skips one complete string starting at its opening quote; NULL if unterminated. */
const u8 *json_skip_string(const u8 *p, const u8 *end);

/* Writes v with `digits` decimals, trailing zeros trimmed but one kept ("0.5", "1.0").
 * Returns the number of bytes written (at most 40). */
u32 json_write_fixed(char *out, double v, int digits);

usize cstrlen(const char *s);
#endif
