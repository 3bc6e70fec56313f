/* config.c — options and config file of liteattnd (see config.h). One table drives getopt,
 * the config-file keys and --help, so the three cannot disagree. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "codes.h"
#include "log.h"

enum kind {
    K_PATH,
    K_DIR,
    K_BACKEND,
    K_INT,
    K_U32,
    K_U64SIZE,
    K_U32SIZE,
    K_LEVEL,
    K_MODE,
    K_FLAG,
    K_VERBOSE,
    K_CONFIG,
    K_HELP,
    K_VERSION
};

typedef struct opt {
    const char *name;
    int shortopt;
    enum kind kind;
    size_t off;
    uint64_t min, max;
    const char *arg, *help;
} opt;

#define OFF(f) offsetof(cfg, f)
static const opt opts[] = {
    {"socket", 's', K_PATH, OFF(socket_path), 0, 0, "PATH",
     "listen here (default $LITEATTN_SOCKET, else $RUNTIME_DIRECTORY/liteattn.sock, else "
     "$XDG_RUNTIME_DIR/liteattn.sock, else /run/liteattn/liteattn.sock); ignored when systemd "
     "passes a listening socket"},
    {"backend", 'b', K_BACKEND, OFF(backend), 0, 0, "cpu|cuda|auto",
     "compute backend (default auto: cuda when a GPU is usable, else cpu)"},
    {"threads", 't', K_INT, OFF(threads), 0, 4096, "N",
     "threads of the CPU backend (0: one per core)"},
    {"foreground", 'f', K_FLAG, 0, 0, 0, NULL,
     "run in the foreground (always: liteattnd never forks; systemd supervises it)"},
    {"verbose", 'v', K_VERBOSE, 0, 0, 0, NULL,
     "log more: each -v raises the level one step (info → debug)"},
    {"log-level", 'l', K_LEVEL, OFF(log_level), 0, 0, "LEVEL",
     "error, warn, info or debug (default info)"},
    {"max-frame", 0, K_U32SIZE, OFF(max_frame), 1024, 64u << 20, "BYTES",
     "largest request frame (default 1M); a larger one closes the connection"},
    {"max-inflight", 0, K_U32, OFF(limits.max_inflight_per_conn), 1, 65536, "N",
     "attention requests in flight per connection (default 64)"},
    {"max-connections-per-user", 0, K_U32, OFF(max_conns_per_user), 1, 1u << 20, "N",
     "connections per Unix user (default 64)"},
    {"max-buffers", 0, K_U32, OFF(limits.max_buffers_per_conn), 1, 1u << 20, "N",
     "registered buffers per connection (default 256)"},
    {"max-buffer-bytes", 0, K_U64SIZE, OFF(limits.max_buffer_bytes_per_conn), 1, UINT64_MAX,
     "BYTES", "bytes of registered buffers per connection (default 64G)"},
    {"max-buffers-per-user", 0, K_U32, OFF(limits.max_buffers_per_user), 1, 1u << 24, "N",
     "registered buffers (each a mapping of the daemon) of one Unix user over all its "
     "connections (default 2048)"},
    {"max-buffers-total", 0, K_U64SIZE, OFF(limits.max_buffers_total), 0, UINT64_MAX, "N",
     "registered buffers of all users (default 0: half of vm.max_map_count), so that the "
     "daemon keeps mappings for new connections"},
    {"max-sessions", 0, K_U32, OFF(limits.max_sessions_per_user), 1, 1u << 20, "N",
     "open sessions per Unix user (default 64)"},
    {"max-mask-bytes", 0, K_U64SIZE, OFF(limits.max_mask_bytes_per_user), 1, UINT64_MAX, "BYTES",
     "skip-mask memory per Unix user (default 4G)"},
    {"mask-memory-cap", 0, K_U64SIZE, OFF(limits.mask_memory_cap), 0, UINT64_MAX, "BYTES",
     "skip-mask memory of all users; to make room, detached sessions are evicted, oldest "
     "first, never below another user's fair share of the cap (default 0: no cap)"},
    {"max-call-cost", 0, K_U64SIZE, OFF(limits.max_call_cost), 0, UINT64_MAX, "MACS",
     "multiply-adds one attention call may cost, counted from its shapes (2*B*H*Sq*Sk*D, "
     "zero strides included); above it LA_ELIMIT (default 128T = 2^47: a B1 H40 S75600 D128 "
     "call is 0.42 of it; 0: no limit)"},
    {"max-queued-cost", 0, K_U64SIZE, OFF(limits.max_queued_cost_per_user), 0, UINT64_MAX, "MACS",
     "multiply-adds of attention calls one Unix user may have queued or running at once; a "
     "call beyond it gets LA_ELIMIT (default 8192T = 2^53; 0: no limit)"},
    {"cpu-slice", 0, K_U64SIZE, OFF(cpu_slice), 0, UINT64_MAX, "MACS",
     "the CPU backend runs calls in slices of about this many multiply-adds and shares the "
     "pool fairly between slices (default 256M; 0: the default)"},
    {"session-grace", 0, K_U32, OFF(limits.session_grace_s), 0, 30u * 86400, "SEC",
     "a session whose connections are gone stays this long for a re-attach (default 300)"},
    {"session-ttl", 0, K_U32, OFF(limits.session_ttl_s), 1, 365u * 86400, "SEC",
     "an idle session is freed after this (default 3600)"},
    {"doorbell-timeout", 0, K_U32, OFF(limits.doorbell_timeout_s), 1, 86400, "SEC",
     "fast path: a GPU call launched on a doorbell its client has not rung after this long "
     "is released (its kernel runs on whatever the inputs hold) and fails with LA_ETIMEDOUT; "
     "it bounds what a client that died or hangs with calls in flight can hold (default 60)"},
    {"max-doorbell-slots", 0, K_U32, OFF(limits.max_doorbell_slots), 1, 1u << 16, "N",
     "fast path: slots of one connection's doorbell, i.e. asynchronous calls it can have in "
     "flight (default 4096; a client uses max_inflight of them)"},
    {"hello-timeout", 0, K_U32, OFF(hello_timeout_s), 1, 3600, "SEC",
     "a connection must send Hello within this, and finish a frame it began within as "
     "long (default 10)"},
    {"max-outbound-bytes", 0, K_U64SIZE, OFF(max_outbound_bytes), 64 * 1024, 1ull << 40, "BYTES",
     "replies queued for a client that does not read them; above this the connection is "
     "closed (default 8M)"},
    {"max-outbound-bytes-per-user", 0, K_U64SIZE, OFF(max_outbound_bytes_per_user), 0, 1ull << 40,
     "BYTES",
     "unread replies over all connections of one Unix user; the connection that queues a "
     "reply beyond it is closed (default 64M; 0: no limit)"},
    {"max-fds-inflight-per-user", 0, K_U32, OFF(max_fds_per_user), 0, 1u << 20, "N",
     "file descriptors one Unix user may have sent and not yet claimed (by a BufferRegister) "
     "over all its connections; beyond it LA_ELIMIT and the connection is closed (default 64; "
     "0: no limit)"},
    {"warm-store-bytes", 0, K_U64SIZE, OFF(limits.warm_store_bytes_per_user), 4096, UINT64_MAX,
     "BYTES",
     "skip masks of earlier generations one Unix user's warm-start store keeps (default "
     "256M); the least recently used warm key's oldest generation goes first"},
    {"warm-max-generations", 0, K_U32, OFF(limits.warm_max_generations), 1, 64, "N",
     "generations kept per warm key (default 8)"},
    {"warm-state-dir", 0, K_DIR, OFF(warm_state_dir), 0, 0, "DIR",
     "persist the warm-start store here (an absolute path; one folder per uid, files written "
     "atomically and checked on load) so that it survives a restart (default: none, kept in "
     "memory only)"},
    {"socket-mode", 'm', K_MODE, OFF(socket_mode), 0, 0777, "OCTAL",
     "permissions of a socket liteattnd creates (default 0660; not applied to a socket "
     "systemd passes: set SocketMode= there)"},
    {"config", 'c', K_CONFIG, 0, 0, 0, "FILE",
     "config file (default " CFG_DEFAULT_FILE ", read only if it exists)"},
    {"help", 'h', K_HELP, 0, 0, 0, NULL, "show this help and exit"},
    {"version", 'V', K_VERSION, 0, 0, 0, NULL, "show the version and exit"},
};
#define N_OPTS (sizeof(opts) / sizeof(opts[0]))

#define fail(err, errlen, ...) errf(err, errlen, LA_EINVAL, __VA_ARGS__)

int cfg_default_socket(char *buf, size_t len)
{
    const char *e;
    int n;
    if ((e = getenv("LITEATTN_SOCKET")) && *e)
        n = snprintf(buf, len, "%s", e);
    else if ((e = getenv("RUNTIME_DIRECTORY")) && *e)
        /* systemd may list several directories, colon-separated: ours is the first. */
        n = snprintf(buf, len, "%.*s/liteattn.sock", (int)strcspn(e, ":"), e);
    else if ((e = getenv("XDG_RUNTIME_DIR")) && *e)
        n = snprintf(buf, len, "%s/liteattn.sock", e);
    else
        n = snprintf(buf, len, "/run/liteattn/liteattn.sock");
    return n < 0 || (size_t)n >= len ? LA_EINVAL : 0;
}

int cfg_parse_size(const char *s, uint64_t *ret)
{
    while (isspace((unsigned char)*s))
        s++;
    if (!isdigit((unsigned char)*s))
        return LA_EINVAL;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno)
        return LA_EINVAL;
    unsigned shift = 0;
    switch (toupper((unsigned char)*end)) {
    case 'K':
        shift = 10;
        end++;
        break;
    case 'M':
        shift = 20;
        end++;
        break;
    case 'G':
        shift = 30;
        end++;
        break;
    case 'T':
        shift = 40;
        end++;
        break;
    default: break;
    }
    if (shift && (*end == 'i' || *end == 'I'))
        end++;
    if (*end == 'B' || *end == 'b')
        end++;
    while (isspace((unsigned char)*end))
        end++;
    if (*end)
        return LA_EINVAL;
    if (shift && v > (UINT64_MAX >> shift))
        return LA_EINVAL;
    *ret = (uint64_t)v << shift;
    return 0;
}

static void defaults(cfg *c)
{
    memset(c, 0, sizeof(*c));
    cfg_default_socket(c->socket_path, sizeof(c->socket_path));
    strcpy(c->backend, "auto");
    c->log_level = LOG_INFO;
    c->max_frame = 1u << 20;
    c->max_conns_per_user = 64;
    eng_config ec;
    eng_config_default(&ec);
    c->limits = ec.limits; /* the engine's defaults, defined there once */
    c->cpu_slice = 0;
    c->hello_timeout_s = 10;
    c->max_outbound_bytes = 8u << 20;
    c->max_outbound_bytes_per_user = 64u << 20;
    c->max_fds_per_user = 64;
    c->socket_mode = 0660;
    c->warm_state_dir[0] = 0;
}

static const opt *find_key(const char *key)
{
    for (size_t i = 0; i < N_OPTS; i++) {
        const char *a = opts[i].name, *b = key;
        while (*a && *b && (*a == *b || (*a == '-' && *b == '_')))
            a++, b++;
        if (!*a && !*b)
            return &opts[i];
    }
    return NULL;
}

/* Applies one setting; where names the source for messages ("--max-frame", "file:3"). */
static int apply(cfg *c, const opt *o, const char *val, const char *where, char *err, size_t errlen)
{
    char *p = (char *)c + o->off;
    uint64_t v;
    switch (o->kind) {
    case K_PATH:
        if (!*val)
            return fail(err, errlen, "%s: empty path", where);
        if (strlen(val) >= CFG_SOCKET_MAX)
            return fail(err, errlen, "%s: socket path longer than %zu bytes", where,
                        CFG_SOCKET_MAX - 1);
        strcpy(p, val);
        return 0;
    case K_DIR:
        /* Empty: not persisted (a config file's setting can be undone on the command line). */
        if (strlen(val) >= sizeof(((cfg *)0)->warm_state_dir))
            return fail(err, errlen, "%s: path longer than %zu bytes", where,
                        sizeof(((cfg *)0)->warm_state_dir) - 1);
        if (*val && *val != '/')
            return fail(err, errlen, "%s: '%s' is not an absolute path", where, val);
        strcpy(p, val);
        return 0;
    case K_BACKEND:
        if (strcmp(val, "cpu") && strcmp(val, "cuda") && strcmp(val, "auto"))
            return fail(err, errlen, "%s: backend '%s' is not cpu, cuda or auto", where, val);
        strcpy(p, val);
        return 0;
    case K_LEVEL: {
        int l = log_level_parse(val);
        if (l < 0)
            return fail(err, errlen, "%s: log level '%s' is not error, warn, info or debug", where,
                        val);
        *(int *)p = l;
        return 0;
    }
    case K_MODE: {
        char *end;
        errno = 0;
        unsigned long m = strtoul(val, &end, 8);
        if (errno || !*val || *end || m > o->max)
            return fail(err, errlen, "%s: '%s' is not an octal mode (0000..0777)", where, val);
        *(unsigned *)p = (unsigned)m;
        return 0;
    }
    case K_INT:
    case K_U32: {
        char *end;
        errno = 0;
        if (!isdigit((unsigned char)*val))
            return fail(err, errlen, "%s: '%s' is not a number", where, val);
        unsigned long long n = strtoull(val, &end, 10);
        if (errno || *end)
            return fail(err, errlen, "%s: '%s' is not a number", where, val);
        v = n;
        break;
    }
    case K_U64SIZE:
    case K_U32SIZE:
        if (cfg_parse_size(val, &v) < 0)
            return fail(err, errlen,
                        "%s: '%s' is not a size (a number with an optional K, M, G or T suffix)",
                        where, val);
        break;
    case K_FLAG: return 0;
    default: return fail(err, errlen, "%s: not a setting", where);
    }
    if (v < o->min || v > o->max)
        return fail(err, errlen, "%s: %s is outside %llu..%llu", where, val,
                    (unsigned long long)o->min, (unsigned long long)o->max);
    if (o->kind == K_INT)
        *(int *)p = (int)v;
    else if (o->kind == K_U32 || o->kind == K_U32SIZE)
        *(uint32_t *)p = (uint32_t)v;
    else
        *(uint64_t *)p = v;
    return 0;
}

static char *trim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    size_t n = strlen(s);
    while (n && isspace((unsigned char)s[n - 1]))
        s[--n] = 0;
    return s;
}

static int load_file(cfg *c, const char *path, int must_exist, char *err, size_t errlen)
{
    FILE *f = fopen(path, "re");
    if (!f) {
        if (!must_exist && errno == ENOENT)
            return 0;
        return fail(err, errlen, "cannot read config file %s: %s", path, strerror(errno));
    }
    char line[4096], where[512];
    int lineno = 0, rc = 0;
    while (rc == 0 && fgets(line, sizeof(line), f)) {
        lineno++;
        snprintf(where, sizeof(where), "%s:%d", path, lineno);
        if (!strchr(line, '\n') && !feof(f)) {
            rc = fail(err, errlen, "%s: line too long", where);
            break;
        }
        /* A comment starts at '#' at the beginning of a line or after white space. */
        for (char *h = line; (h = strchr(h, '#')); h++)
            if (h == line || isspace((unsigned char)h[-1])) {
                *h = 0;
                break;
            }
        char *s = trim(line);
        if (!*s)
            continue;
        char *eq = strchr(s, '=');
        if (!eq) {
            rc = fail(err, errlen, "%s: expected 'key = value'", where);
            break;
        }
        *eq = 0;
        char *key = trim(s), *val = trim(eq + 1);
        size_t vn = strlen(val);
        if (vn >= 2 && val[0] == '"' && val[vn - 1] == '"') {
            val[vn - 1] = 0;
            val++;
        }
        const opt *o = find_key(key);
        if (!o || o->kind == K_CONFIG || o->kind == K_HELP || o->kind == K_VERSION ||
            o->kind == K_VERBOSE) {
            rc = fail(err, errlen, "%s: unknown key '%s' (see liteattnd --help)", where, key);
            break;
        }
        rc = apply(c, o, val, where, err, errlen);
    }
    fclose(f);
    return rc;
}

static void print_help(const char *prog)
{
    printf(
        "Usage: %s [OPTION]...\n"
        "liteattnd serves LiteAttention (temporal sparse attention) to clients on a Unix socket.\n"
        "It always runs in the foreground and never forks; under systemd (Type=notify) it\n"
        "reports readiness, status and watchdog pings, and adopts a socket-activated socket.\n\n",
        prog);
    for (size_t i = 0; i < N_OPTS; i++) {
        const opt *o = &opts[i];
        char left[64];
        int n = 0;
        if (o->shortopt)
            n = snprintf(left, sizeof(left), "  -%c, --%s", o->shortopt, o->name);
        else
            n = snprintf(left, sizeof(left), "      --%s", o->name);
        if (o->arg)
            snprintf(left + n, sizeof(left) - (size_t)n, " %s", o->arg);
        /* Wrap the description at 100 columns, aligned after the option. */
        printf("%-38s", left);
        const char *h = o->help;
        while (*h) {
            size_t take = strlen(h);
            if (take > 61) {
                take = 61;
                while (take > 0 && h[take] != ' ')
                    take--;
                if (take == 0)
                    take = strcspn(h, " ");
            }
            printf(" %.*s\n", (int)take, h);
            h += take;
            while (*h == ' ')
                h++;
            if (*h)
                printf("%-38s", "");
        }
    }
    printf("\nSizes accept K, M, G, T suffixes (powers of 1024). Bad options exit with status 2.\n"
           "\nConfig file: lines 'key = value', '#' starts a comment. Keys are the long option\n"
           "names with '-' written '_' (socket, backend, threads, foreground, log_level,\n"
           "max_frame, max_inflight, max_connections_per_user, max_buffers, max_buffer_bytes,\n"
           "max_buffers_per_user, max_buffers_total,\n"
           "max_sessions, max_mask_bytes, mask_memory_cap, max_call_cost, max_queued_cost,\n"
           "cpu_slice, session_grace, session_ttl, doorbell_timeout, max_doorbell_slots,\n"
           "hello_timeout, max_outbound_bytes, max_outbound_bytes_per_user,\n"
           "max_fds_inflight_per_user, warm_store_bytes, warm_max_generations, warm_state_dir,\n"
           "socket_mode). Command-line flags override the file.\n"
           "\nFlow control: a connection with max_inflight attention requests in flight is not\n"
           "read until one finishes; requests beyond the limit that already arrived are\n"
           "answered with LA_EBUSY. A client that lets more than max_outbound_bytes of replies\n"
           "queue up is disconnected, and so is the connection that takes a user's unread\n"
           "replies over max_outbound_bytes_per_user.\n"
           "\nExit status: 0 after SIGTERM/SIGINT (in-flight work finished), 1 on a second\n"
           "signal or a start-up failure, 2 for bad options, 3 after a fatal GPU error.\n");
}

int cfg_parse(cfg *c, int argc, char **argv, char *err, size_t errlen)
{
    defaults(c);
    struct option lopts[N_OPTS + 1];
    char shorts[N_OPTS * 2 + 2], *sp = shorts;
    *sp++ = ':';
    for (size_t i = 0; i < N_OPTS; i++) {
        int has_arg = opts[i].arg ? required_argument : no_argument;
        lopts[i] = (struct option){opts[i].name, has_arg, NULL, (int)(256 + i)};
        if (opts[i].shortopt) {
            *sp++ = (char)opts[i].shortopt;
            if (has_arg)
                *sp++ = ':';
        }
    }
    lopts[N_OPTS] = (struct option){0, 0, 0, 0};
    *sp = 0;

    /* Pass 1: collect, so that the file is read first and the flags override it. */
    typedef struct {
        const opt *o;
        const char *val;
    } entry;
    entry *ent = calloc((size_t)argc + 1, sizeof(*ent));
    if (!ent)
        return fail(err, errlen, "out of memory");
    size_t n_ent = 0;
    const char *config = NULL;
    int verbose = 0, rc = CFG_RUN, ch;
    opterr = 0;
    optind = 1;
    while ((ch = getopt_long(argc, argv, shorts, lopts, NULL)) != -1) {
        const opt *o = NULL;
        if (ch >= 256)
            o = &opts[ch - 256];
        else if (ch == '?' || ch == ':') {
            const char *what = argv[optind - 1];
            char sbuf[3] = {'-', (char)optopt, 0};
            if (optopt && (what[0] != '-' || what[1] == '-' || strlen(what) != 2))
                what = sbuf; /* a bad letter inside grouped short options */
            rc = fail(err, errlen,
                      ch == '?' ? "unknown option '%s' (see --help)"
                                : "option '%s' needs a value (see --help)",
                      what);
            goto out;
        } else
            for (size_t i = 0; i < N_OPTS; i++)
                if (opts[i].shortopt == ch)
                    o = &opts[i];
        if (!o) {
            rc = fail(err, errlen, "internal: unhandled option");
            goto out;
        }
        switch (o->kind) {
        case K_HELP:
            print_help(argv[0]);
            rc = CFG_EXIT_OK;
            goto out;
        case K_VERSION:
            printf("liteattnd %s (protocol %d.%d)\n", LA_VERSION_STRING, LA_PROTOCOL_MAJOR,
                   LA_PROTOCOL_MINOR);
            rc = CFG_EXIT_OK;
            goto out;
        case K_CONFIG: config = optarg; break;
        case K_VERBOSE: verbose++; break;
        default: ent[n_ent++] = (entry){o, optarg}; break;
        }
    }
    if (optind < argc) {
        rc = fail(err, errlen, "unexpected argument '%s' (see --help)", argv[optind]);
        goto out;
    }
    rc = load_file(c, config ? config : CFG_DEFAULT_FILE, config != NULL, err, errlen);
    for (size_t i = 0; rc == 0 && i < n_ent; i++) {
        char where[80];
        snprintf(where, sizeof(where), "--%s", ent[i].o->name);
        rc = apply(c, ent[i].o, ent[i].val ? ent[i].val : "", where, err, errlen);
    }
    if (rc == 0) {
        c->log_level += verbose;
        if (c->log_level > LOG_DEBUG)
            c->log_level = LOG_DEBUG;
    }
out:
    free(ent);
    return rc;
}
