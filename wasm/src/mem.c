/* Memory for a module without libc: a size-class allocator on linear memory.
 *
 * Envoy hands buffers (bodies, headers, properties) to the module through
 * proxy_on_memory_allocate, and the module frees them; the filter itself allocates per
 * stream and per batch. Power-of-two classes with free lists keep both O(1), reuse
 * memory across requests and never fragment badly; linear memory is never returned, as
 * with any wasm allocator.
 */
#include "abi.h"

extern u8 __heap_base;

#define MIN_CLASS 4  /* 16 bytes */
#define MAX_CLASS 31
#define HEADER 8

static void *free_lists[MAX_CLASS + 1];
static usize heap_top;
static usize heap_end;

static u32 class_of(usize n) {
  u32 c = MIN_CLASS;
  while (((usize)1 << c) < n) c++;
  return c;
}

static u8 *grow(usize bytes) {
  if (heap_top == 0) {
    heap_top = ((usize)&__heap_base + 15) & ~(usize)15;
    heap_end = __builtin_wasm_memory_size(0) * 65536;
  }
  if (heap_top + bytes > heap_end) {
    usize need = heap_top + bytes - heap_end;
    usize pages = (need + 65535) / 65536;
    if (__builtin_wasm_memory_grow(0, pages) == (usize)-1) return 0;
    heap_end += pages * 65536;
  }
  u8 *p = (u8 *)heap_top;
  heap_top += bytes;
  return p;
}

void *malloc(usize n) {
  if (n > ((usize)1 << (MAX_CLASS - 1))) return 0;
  u32 c = class_of(n + HEADER);
  u8 *block = free_lists[c];
  if (block) {
    free_lists[c] = *(void **)(block + HEADER);
  } else {
    block = grow((usize)1 << c);
    if (!block) return 0;
  }
  *(u32 *)block = c;
  return block + HEADER;
}

void free(void *p) {
  if (!p) return;
  u8 *block = (u8 *)p - HEADER;
  u32 c = *(u32 *)block;
  *(void **)p = free_lists[c];
  free_lists[c] = block;
}

void *realloc(void *p, usize n) {
  if (!p) return malloc(n);
  u8 *block = (u8 *)p - HEADER;
  usize have = ((usize)1 << *(u32 *)block) - HEADER;
  if (n <= have) return p;
  void *q = malloc(n);
  if (!q) return 0;
  memcpy(q, p, have);
  free(p);
  return q;
}

EXPORT(proxy_on_memory_allocate) void *proxy_on_memory_allocate(usize n) { return malloc(n); }

int memcmp(const void *a, const void *b, usize n) {
  const u8 *x = a, *y = b;
  for (; n; n--, x++, y++)
    if (*x != *y) return *x - *y;
  return 0;
}
