/* A minimal NVTX tool for tests: loaded through NVTX_INJECTION64_PATH, it records every domain range
 * push/pop (domain, message, category, payload, thread) to the file named by HALLOLIVE_NVTX_RECORD.
 *
 * No NVTX header is needed: the few ABI pieces a tool sees are declared below from NVTX v3's documented
 * layout (nvToolsExt.h and nvtxDetail/nvtxTypes.h). The NVTX client in the process (here the `nvtx`
 * Python package) finds this library through the environment variable, calls
 * InitializeInjectionNvtx2 with its export-table getter, and from then on calls the function pointers
 * we write into its CORE2 (domain API) table. Slots we leave alone become no-ops.
 *
 * Output, one event per line, tab separated:
 *   domain  <handle> <name>
 *   string  <handle> <text>
 *   category <domain name> <id> <name>
 *   push    <domain name> <tid> <message> <category> <payload type> <payload>
 *   pop     <domain name> <tid>
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <wchar.h>

/* ---- NVTX v3 ABI, as far as a range-recording tool needs it ------------------------------------- */

typedef struct tool_domain tool_domain;   /* nvtxDomainHandle_t points at a tool-owned struct */
typedef struct tool_string tool_string;   /* so does nvtxStringHandle_t */

typedef struct {
    uint16_t version;
    uint16_t size;
    uint32_t category;
    int32_t colorType;
    uint32_t color;
    int32_t payloadType;  /* 1 u64, 2 i64, 3 double, 4 u32, 5 i32, 6 float, others: extensions */
    int32_t reserved0;
    union { uint64_t u64; int64_t i64; double f64; uint32_t u32; int32_t i32; float f32; } payload;
    int32_t messageType;  /* 1 ASCII, 2 wide, 3 registered string handle */
    union { const char *ascii; const wchar_t *wide; const tool_string *registered; } message;
} event_attributes;

typedef void (*any_fn)(void);
typedef const void *(*get_export_table_fn)(uint32_t table_id);
typedef struct {
    size_t struct_size;
    int (*GetModuleFunctionTable)(int module, any_fn ***out_table, unsigned int *out_size);
} callbacks_table;

enum { ETID_CALLBACKS = 1, MODULE_CORE2 = 5 };
enum { /* indices into the CORE2 (domain) function table */
    CORE2_RangePushEx = 4, CORE2_RangePop = 5, CORE2_NameCategoryA = 8, CORE2_RegisterStringA = 10,
    CORE2_DomainCreateA = 12, CORE2_DomainDestroy = 14,
};

/* ---- the tool ------------------------------------------------------------------------------------- */

struct tool_domain { char *name; };
struct tool_string { char *text; };

static FILE *out;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static long thread_id(void) { return (long)syscall(SYS_gettid); }

static const char *domain_name(const tool_domain *d) { return d ? d->name : "<default>"; }

/* Messages are written on one line: replace tabs/newlines so the format stays parseable. */
static void put_clean(const char *s) {
    for (; s && *s; ++s) fputc((*s == '\t' || *s == '\n') ? ' ' : *s, out);
}

static tool_domain *domain_create(const char *name) {
    tool_domain *d = calloc(1, sizeof *d);
    d->name = strdup(name ? name : "");
    pthread_mutex_lock(&lock);
    fprintf(out, "domain\t%p\t", (void *)d); put_clean(d->name); fputc('\n', out); fflush(out);
    pthread_mutex_unlock(&lock);
    return d;
}

/* Handles stay valid until exit: the client may still hold attributes that point at them. */
static void domain_destroy(tool_domain *d) { (void)d; }

static tool_string *register_string(tool_domain *d, const char *text) {
    tool_string *s = calloc(1, sizeof *s);
    s->text = strdup(text ? text : "");
    pthread_mutex_lock(&lock);
    fprintf(out, "string\t%p\t%s\t", (void *)s, domain_name(d)); put_clean(s->text); fputc('\n', out);
    fflush(out);
    pthread_mutex_unlock(&lock);
    return s;
}

static void name_category(tool_domain *d, uint32_t id, const char *name) {
    pthread_mutex_lock(&lock);
    fprintf(out, "category\t%s\t%u\t", domain_name(d), id); put_clean(name); fputc('\n', out);
    fflush(out);
    pthread_mutex_unlock(&lock);
}

static void write_payload(const event_attributes *a) {
    switch (a->payloadType) {
    case 1: fprintf(out, "u64\t%llu", (unsigned long long)a->payload.u64); break;
    case 2: fprintf(out, "i64\t%lld", (long long)a->payload.i64); break;
    case 3: fprintf(out, "f64\t%.17g", a->payload.f64); break;
    case 4: fprintf(out, "u32\t%u", a->payload.u32); break;
    case 5: fprintf(out, "i32\t%d", a->payload.i32); break;
    case 6: fprintf(out, "f32\t%.9g", (double)a->payload.f32); break;
    case 0: fputs("none\t-", out); break;
    default: fprintf(out, "other:%d\t-", a->payloadType); break;
    }
}

static int range_push(tool_domain *d, const event_attributes *a) {
    pthread_mutex_lock(&lock);
    fprintf(out, "push\t%s\t%ld\t", domain_name(d), thread_id());
    if (a->messageType == 3 && a->message.registered) put_clean(a->message.registered->text);
    else if (a->messageType == 1) put_clean(a->message.ascii);
    else fputs("<unsupported message type>", out);
    fprintf(out, "\t%u\t", a->category);
    write_payload(a);
    fputc('\n', out);
    fflush(out);
    pthread_mutex_unlock(&lock);
    return 0;
}

static int range_pop(tool_domain *d) {
    pthread_mutex_lock(&lock);
    fprintf(out, "pop\t%s\t%ld\n", domain_name(d), thread_id());
    fflush(out);
    pthread_mutex_unlock(&lock);
    return 0;
}

static void set_slot(any_fn **table, unsigned int size, unsigned int index, any_fn fn) {
    if (index < size && table[index]) *table[index] = fn;
}

/* The entry point NVTX looks up with dlsym; returning 0 tells NVTX to unload us. */
__attribute__((visibility("default"))) int InitializeInjectionNvtx2(get_export_table_fn get_table) {
    const char *path = getenv("HALLOLIVE_NVTX_RECORD");
    if (!path || !*path || !get_table) return 0;
    const callbacks_table *cb = (const callbacks_table *)get_table(ETID_CALLBACKS);
    if (!cb || !cb->GetModuleFunctionTable) return 0;
    any_fn **table = NULL;
    unsigned int size = 0;
    if (!cb->GetModuleFunctionTable(MODULE_CORE2, &table, &size) || !table) return 0;
    out = fopen(path, "w");
    if (!out) return 0;
    set_slot(table, size, CORE2_DomainCreateA, (any_fn)domain_create);
    set_slot(table, size, CORE2_DomainDestroy, (any_fn)domain_destroy);
    set_slot(table, size, CORE2_RegisterStringA, (any_fn)register_string);
    set_slot(table, size, CORE2_NameCategoryA, (any_fn)name_category);
    set_slot(table, size, CORE2_RangePushEx, (any_fn)range_push);
    set_slot(table, size, CORE2_RangePop, (any_fn)range_pop);
    fputs("init\t-\n", out);
    fflush(out);
    return 1;
}
