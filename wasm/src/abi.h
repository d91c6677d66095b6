/* The proxy-wasm ABI 0.2.1 host calls this filter uses, and the freestanding basics.
 *
 * No libc: the module is built with clang --target=wasm32 -nostdlib, so it imports only
 * what Envoy provides (module "env", plus WASI random_get for an unguessable noise key).
 */
#ifndef MODELGUARD_ABI_H
#define MODELGUARD_ABI_H

typedef unsigned char u8;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef long long i64;
typedef unsigned long usize;

#define IMPORT(name) __attribute__((import_module("env"), import_name(#name)))
#define EXPORT(name) __attribute__((export_name(#name)))

enum { WASM_OK = 0, WASM_NOT_FOUND = 1 };
enum { LOG_TRACE = 0, LOG_DEBUG = 1, LOG_INFO = 2, LOG_WARN = 3, LOG_ERROR = 4 };
enum {
  BUF_REQUEST_BODY = 0,
  BUF_RESPONSE_BODY = 1,
  BUF_GRPC_RECEIVE = 5,
  BUF_VM_CONFIGURATION = 6,
  BUF_PLUGIN_CONFIGURATION = 7,
};
enum { MAP_REQUEST_HEADERS = 0, MAP_RESPONSE_HEADERS = 2 };
enum { HEADERS_CONTINUE = 0, HEADERS_STOP = 1 };
enum { DATA_CONTINUE = 0, DATA_STOP_AND_BUFFER = 1 };
enum { TRAILERS_CONTINUE = 0, TRAILERS_STOP = 1 };
enum { METRIC_COUNTER = 0, METRIC_GAUGE = 1 };

IMPORT(proxy_log) i32 proxy_log(i32 level, const char *msg, usize size);
IMPORT(proxy_get_buffer_bytes)
i32 proxy_get_buffer_bytes(i32 type, u32 start, u32 length, u8 **ptr, usize *size);
IMPORT(proxy_get_buffer_status)
i32 proxy_get_buffer_status(i32 type, usize *length, u32 *flags);
IMPORT(proxy_set_buffer_bytes)
i32 proxy_set_buffer_bytes(i32 type, u32 start, u32 length, const u8 *data, usize size);
IMPORT(proxy_get_header_map_value)
i32 proxy_get_header_map_value(i32 type, const char *key, usize key_size, u8 **value,
                               usize *value_size);
IMPORT(proxy_get_header_map_pairs)
i32 proxy_get_header_map_pairs(i32 type, u8 **ptr, usize *size);
IMPORT(proxy_replace_header_map_value)
i32 proxy_replace_header_map_value(i32 type, const char *key, usize key_size, const char *value,
                                   usize value_size);
IMPORT(proxy_get_property)
i32 proxy_get_property(const char *path, usize path_size, u8 **value, usize *value_size);
IMPORT(proxy_set_property)
i32 proxy_set_property(const char *path, usize path_size, const char *value, usize value_size);
IMPORT(proxy_set_tick_period_milliseconds) i32 proxy_set_tick_period_milliseconds(u32 ms);
IMPORT(proxy_get_current_time_nanoseconds) i32 proxy_get_current_time_nanoseconds(u64 *ns);
IMPORT(proxy_grpc_call)
i32 proxy_grpc_call(const u8 *service, usize service_size, const char *service_name,
                    usize service_name_size, const char *method, usize method_size,
                    const u8 *metadata, usize metadata_size, const u8 *request,
                    usize request_size, u32 timeout_ms, u32 *token);
IMPORT(proxy_set_effective_context) i32 proxy_set_effective_context(u32 context_id);
IMPORT(proxy_define_metric)
i32 proxy_define_metric(i32 type, const char *name, usize name_size, u32 *metric_id);
IMPORT(proxy_increment_metric) i32 proxy_increment_metric(u32 metric_id, i64 offset);
IMPORT(proxy_done) i32 proxy_done(void);
IMPORT(proxy_send_local_response)
i32 proxy_send_local_response(u32 status, const char *details, usize details_size,
                              const char *body, usize body_size, const u8 *headers,
                              usize headers_size, i32 grpc_status);

__attribute__((import_module("wasi_snapshot_preview1"), import_name("random_get")))
i32 wasi_random_get(u8 *buf, usize len);

void *malloc(usize n);
void free(void *p);
void *realloc(void *p, usize n);
int memcmp(const void *a, const void *b, usize n);
/* Built with -mbulk-memory: these become memory.copy / memory.fill instructions (the
 * runtime's own copy), not byte loops in the module. */
#define memcpy(dst, src, n) __builtin_memcpy((dst), (src), (n))
#define memmove(dst, src, n) __builtin_memmove((dst), (src), (n))
#define memset(dst, c, n) __builtin_memset((dst), (c), (n))

#endif
