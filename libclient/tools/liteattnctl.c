/* liteattnctl — look at a running liteattnd: status, sessions, stats, metrics, ping. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "escape.h"
#include "liteattn.h"

static const char *prog = "liteattnctl";

static void usage(FILE *f)
{
    fprintf(f,
            "usage: %s [--socket PATH] [--json] COMMAND\n"
            "\n"
            "commands:\n"
            "  status          daemon version, protocol, backends, devices, MPS and limits\n"
            "  sessions        open sessions visible to this user: whether each started warm (its\n"
            "                  warm key and the generations its seed combines), what the quality\n"
            "                  guardrail checked and restored, the live fraction of every layer\n"
            "  warm            the warm-start store of this user (root: of every user)\n"
            "  warm drop KEY   forget this user's stored masks of warm key KEY (--all: every key)\n"
            "  stats           daemon counters\n"
            "  metrics         the counters and per-session/per-user gauges in the Prometheus\n"
            "                  text format (for node_exporter's textfile collector)\n"
            "  ping [-n COUNT] COUNT round trips (default 1000): min, median, p99 in microseconds\n"
            "\n"
            "options:\n"
            "  --socket PATH   daemon socket (default: $LITEATTN_SOCKET, else\n"
            "                  $XDG_RUNTIME_DIR/liteattn.sock, else /run/liteattn/liteattn.sock)\n"
            "  --json          machine-readable output\n"
            "  -h, --help      this text\n"
            "\n"
            "exit status: 0 success, 1 the daemon could not be reached or answered an error,\n"
            "2 usage error\n",
            prog);
}

/* ---- JSON helpers ---- */
static void json_str(const char *s)
{
    putchar('"');
    for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++) {
        switch (*p) {
        case '"': fputs("\\\"", stdout); break;
        case '\\': fputs("\\\\", stdout); break;
        case '\n': fputs("\\n", stdout); break;
        case '\r': fputs("\\r", stdout); break;
        case '\t': fputs("\\t", stdout); break;
        case '\b': fputs("\\b", stdout); break;
        case '\f': fputs("\\f", stdout); break;
        default:
            if (*p < 0x20 || *p == 0x7f)
                printf("\\u%04x", *p);
            else
                putchar(*p);
        }
    }
    putchar('"');
}

/* The next item of the list *p (items separated by sep) into buf (cut to len), *p moved past
 * it and its separator; 0 at the end of the list. */
static int next_item(const char **p, char sep, char *buf, size_t len)
{
    if (!**p)
        return 0;
    const char *end = strchr(*p, sep);
    size_t n = end ? (size_t)(end - *p) : strlen(*p);
    snprintf(buf, len, "%.*s", (int)n, *p);
    *p += n + (end ? 1 : 0);
    return 1;
}

/* A line "<uuid> <backend> <name>" of the "devices" property, split in place: line keeps the
 * uuid, *ret_backend and *ret_name point into it (NULL where the line stops short). */
static void split_device(char *line, char **ret_backend, char **ret_name)
{
    char *backend = strchr(line, ' '), *name = NULL;
    if (backend) {
        *backend++ = 0;
        name = strchr(backend, ' ');
        if (name)
            *name++ = 0;
    }
    *ret_backend = backend;
    *ret_name = name;
}

/* A cell that is a plain JSON number (integer or decimal) is written as is. */
/* The items of a comma-separated list, as JSON strings separated by ", " (an empty list: none). */
static void json_str_items(const char *p)
{
    int first = 1;
    char b[256];
    while (next_item(&p, ',', b, sizeof(b))) {
        printf("%s", first ? "" : ", ");
        json_str(b);
        first = 0;
    }
}

static int is_number(const char *s)
{
    if (!s || !*s)
        return 0;
    char *end;
    errno = 0;
    strtod(s, &end);
    if (*end || errno)
        return 0;
    /* JSON forbids leading '+', "inf", "nan", hex, leading '.' */
    const char *p = s + (*s == '-');
    if (!(*p >= '0' && *p <= '9'))
        return 0;
    for (; *p; p++)
        if (!strchr("0123456789.eE+-", *p))
            return 0;
    return 1;
}

static int fail_rc(const char *what, int rc)
{
    const char *m = la_last_error_message();
    fprintf(stderr, "%s: %s: %s [%s]\n", prog, what, m && *m ? m : la_strerror(rc),
            la_err_name(rc));
    return 1;
}

/* ---- status ---- */
static const char *prop(la_client *c, const char *name)
{
    const char *v = la_client_property(c, name);
    return v ? v : "";
}

static const char *const limit_names[] = {
    "max_frame",           "max_inflight",       "max_buffers",      "max_sessions",
    "max_mask_bytes",      "max_connections",    "session_grace_s",  "session_ttl_s",
    "doorbell_timeout_ms", "max_doorbell_slots", "warm_store_bytes", "warm_max_generations"};
#define N_LIMITS (sizeof(limit_names) / sizeof(limit_names[0]))

/* The daemon's value of limit i (a property "limit.<name>"), or NULL. */
static const char *limit_value(la_client *c, size_t i)
{
    char key[64];
    snprintf(key, sizeof(key), "limit.%s", limit_names[i]);
    return la_client_property(c, key);
}

/* One line of the "mps" property: "<uuid> on|off|unknown <sm_count>". 0 on success. */
static int mps_line(const char **p, char *uuid, size_t ulen, char *state, size_t slen,
                    unsigned *sms)
{
    char line[512];
    if (!next_item(p, '\n', line, sizeof(line)))
        return -1;
    char u[256] = "", st[32] = "";
    *sms = 0;
    if (sscanf(line, "%255s %31s %u", u, st, sms) < 2)
        return -1;
    snprintf(uuid, ulen, "%s", u);
    snprintf(state, slen, "%s", st);
    return 0;
}

/* What the daemon says about MPS: per GPU whether its context is an MPS client (CUDA's own
 * answer), and where its driver looks for the control daemon. "off" says why when it can. */
static void print_mps(la_client *c, int json)
{
    const char *lines = prop(c, "mps"), *dir = prop(c, "mps.pipe_directory");
    const char *ctl = la_client_property(c, "mps.control");
    int control = ctl && !strcmp(ctl, "yes");
    char uuid[256], state[32];
    unsigned sms;
    if (json) {
        printf(", \"mps\": {\"pipe_directory\": ");
        json_str(dir);
        printf(", \"control\": %s, \"devices\": [", !ctl ? "null" : control ? "true" : "false");
        int first = 1;
        for (const char *p = lines; mps_line(&p, uuid, sizeof uuid, state, sizeof state, &sms) == 0;) {
            if (strncmp(uuid, "GPU-", 4) != 0)
                continue; /* the cpu device */
            printf("%s{\"uuid\": ", first ? "" : ", ");
            json_str(uuid);
            printf(", \"mps\": %s, \"sm_count\": %u}",
                   !strcmp(state, "on") ? "true" : !strcmp(state, "off") ? "false" : "null", sms);
            first = 0;
        }
        printf("]}");
        return;
    }
    int gpus = 0;
    for (const char *p = lines; mps_line(&p, uuid, sizeof uuid, state, sizeof state, &sms) == 0;) {
        if (strncmp(uuid, "GPU-", 4) != 0)
            continue;
        const char *label = gpus++ ? "" : "mps";
        if (!strcmp(state, "on"))
            printf("%-10s on: %s is an MPS client (%u SMs); control daemon at %s\n", label, uuid,
                   sms, *dir ? dir : "?");
        else if (!strcmp(state, "off") && control)
            printf("%-10s off for %s: a control daemon listens at %s, but the daemon's context "
                   "is not its client (the daemon started first, or another user's MPS server "
                   "holds the GPU): restart liteattnd as the user of the other MPS clients\n",
                   label, uuid, dir);
        else if (!strcmp(state, "off"))
            printf("%-10s off for %s: no MPS control daemon at %s (the daemon's view; "
                   "nvidia-cuda-mps-control -d with CUDA_MPS_PIPE_DIRECTORY there starts one)\n",
                   label, uuid, *dir ? dir : "?");
        else
            printf("%-10s unknown for %s (the CUDA driver does not report it); control daemon "
                   "at %s: %s\n",
                   label, uuid, *dir ? dir : "?", control ? "yes" : "no");
    }
    if (!gpus)
        printf("%-10s n/a (no GPU backend)\n", "mps");
}

static int cmd_status(la_client *c, const char *sock, int json)
{
    const char *backends = prop(c, "backends");
    const char *devices = prop(c, "devices");
    if (json) {
        printf("{\"socket\": ");
        json_str(sock);
        printf(", \"daemon_version\": ");
        json_str(prop(c, "daemon.version"));
        printf(", \"protocol\": ");
        json_str(prop(c, "protocol"));
        printf(", \"library_version\": ");
        json_str(la_version());
        printf(", \"backends\": [");
        json_str_items(backends);
        printf("], \"devices\": [");
        const char *p = devices;
        int first = 1;
        char line[512];
        while (next_item(&p, '\n', line, sizeof(line))) {
            char *backend, *name;
            split_device(line, &backend, &name);
            printf("%s{\"uuid\": ", first ? "" : ", ");
            json_str(line);
            printf(", \"backend\": ");
            json_str(backend ? backend : "");
            printf(", \"name\": ");
            json_str(name ? name : "");
            printf("}");
            first = 0;
        }
        printf("], \"fastpath_devices\": [");
        json_str_items(prop(c, "fastpath.devices"));
        printf("]");
        print_mps(c, 1);
        printf(", \"limits\": {");
        first = 1;
        for (size_t i = 0; i < N_LIMITS; i++) {
            const char *v = limit_value(c, i);
            if (!v)
                continue;
            printf("%s", first ? "" : ", ");
            json_str(limit_names[i]);
            printf(": %s", is_number(v) ? v : "null");
            first = 0;
        }
        printf("}}\n");
        return 0;
    }
    printf("%-10s %s\n", "socket", sock);
    printf("%-10s liteattnd %s\n", "daemon", prop(c, "daemon.version"));
    printf("%-10s %s (libliteattn %s, protocol %d.%d)\n", "protocol", prop(c, "protocol"),
           la_version(), LA_PROTOCOL_MAJOR, LA_PROTOCOL_MINOR);
    printf("%-10s %s\n", "backends", *backends ? backends : "(none)");
    if (!*devices) {
        printf("%-10s (none)\n", "devices");
    } else {
        /* "<uuid> <backend> <name>" per device, shown as "cpu: CPU reference (2 threads)" or
         * "cuda: NVIDIA H200 (GPU-...)": the uuid only where it says more than the backend. */
        const char *p = devices;
        int first = 1;
        char line[512];
        while (next_item(&p, '\n', line, sizeof(line))) {
            char *backend, *name;
            split_device(line, &backend, &name);
            if (!backend || !name)
                printf("%-10s %s\n", first ? "devices" : "", line);
            else if (!strcmp(line, backend))
                printf("%-10s %s: %s\n", first ? "devices" : "", backend, name);
            else
                printf("%-10s %s: %s (%s)\n", first ? "devices" : "", backend, name, line);
            first = 0;
        }
    }
    /* The devices that take fast-path calls (docs/FASTPATH.md). */
    const char *fast = prop(c, "fastpath.devices");
    printf("%-10s %s\n", "fastpath", *fast ? fast : "(none)");
    print_mps(c, 0);
    int first = 1;
    for (size_t i = 0; i < N_LIMITS; i++) {
        const char *v = limit_value(c, i);
        if (!v)
            continue;
        printf("%-10s %-20s %s\n", first ? "limits" : "", limit_names[i], v);
        first = 0;
    }
    return 0;
}

/* ---- tables ---- */
/* A cell as printed in a text table: escaped (common/escape.h), since keys are the clients'
 * bytes and this output goes to a terminal. */
static const char *cell(const la_table *t, size_t r, size_t col, char *buf, size_t cap)
{
    return esc_str(buf, cap, la_table_text(t, r, col));
}

static void print_table(const la_table *t, int json, int as_object)
{
    size_t rows = la_table_rows(t), cols = la_table_cols(t);
    if (json) {
        if (as_object) { /* name/value pairs */
            printf("{");
            for (size_t r = 0; r < rows; r++) {
                const char *v = la_table_text(t, r, 1);
                printf("%s", r ? ", " : "");
                json_str(la_table_text(t, r, 0));
                printf(": ");
                if (is_number(v))
                    printf("%s", v);
                else
                    json_str(v);
            }
            printf("}\n");
            return;
        }
        printf("[");
        for (size_t r = 0; r < rows; r++) {
            printf("%s{", r ? ", " : "");
            for (size_t col = 0; col < cols; col++) {
                const char *name = la_table_col_name(t, col);
                const char *v = la_table_text(t, r, col);
                printf("%s", col ? ", " : "");
                json_str(name);
                printf(": ");
                if (!strcmp(name, "attached") || !strcmp(name, "persisted"))
                    printf("%s", v && !strcmp(v, "1") ? "true" : "false");
                else if (!strcmp(name, "layer_live"))
                    printf("[%s]", v ? v : ""); /* comma-separated numbers: a JSON array */
                else if (strcmp(name, "key") && strcmp(name, "device") &&
                         strcmp(name, "warm_key") && is_number(v))
                    printf("%s", v);
                else
                    json_str(v);
            }
            printf("}");
        }
        printf("]\n");
        return;
    }
    size_t *w = calloc(cols ? cols : 1, sizeof(size_t));
    if (!w)
        return;
    for (size_t col = 0; col < cols; col++) {
        w[col] = strlen(la_table_col_name(t, col));
        for (size_t r = 0; r < rows; r++) {
            char buf[4096];
            size_t n = strlen(cell(t, r, col, buf, sizeof(buf)));
            if (n > w[col])
                w[col] = n;
        }
    }
    if (!as_object) {
        /* Headings sit over their column: right-aligned over numbers. */
        for (size_t col = 0; col < cols; col++) {
            int numeric = rows > 0;
            for (size_t r = 0; r < rows && numeric; r++)
                numeric = is_number(la_table_text(t, r, col));
            if (numeric)
                printf("%s%*s", col ? "  " : "", (int)w[col], la_table_col_name(t, col));
            else
                printf("%s%-*s", col ? "  " : "", col + 1 < cols ? (int)w[col] : 0,
                       la_table_col_name(t, col));
        }
        printf("\n");
    }
    for (size_t r = 0; r < rows; r++) {
        for (size_t col = 0; col < cols; col++) {
            char buf[4096];
            const char *v = cell(t, r, col, buf, sizeof(buf));
            /* Numbers right-aligned, text left-aligned; no padding after the last column. */
            if (col + 1 == cols && !is_number(v))
                printf("%s%s", col ? "  " : "", v);
            else if (is_number(v))
                printf("%s%*s", col ? "  " : "", (int)w[col], v);
            else
                printf("%s%-*s", col ? "  " : "", (int)w[col], v);
        }
        printf("\n");
    }
    free(w);
}

/* Prints the table that list gives (what names it in an error); none, when not NULL, is the
 * line printed instead of an empty table; as_object as print_table takes it. */
static int show_table(la_client *c, int (*list)(la_client *, la_table **), const char *what,
                      int json, const char *none, int as_object)
{
    la_table *t;
    int rc = list(c, &t);
    if (rc < 0)
        return fail_rc(what, rc);
    if (none && !json && la_table_rows(t) == 0)
        printf("%s\n", none);
    else
        print_table(t, json, as_object);
    la_table_free(t);
    return 0;
}

static int cmd_sessions(la_client *c, int json)
{
    return show_table(c, la_sessions, "sessions", json, "no open sessions", 0);
}

static int cmd_warm(la_client *c, int json, int n_args, char **args, int all)
{
    if (n_args == 0)
        return show_table(c, la_warm_list, "warm", json, "no stored warm-start masks", 0);
    uint64_t n = 0;
    int rc = la_warm_drop(c, all ? NULL : args[1], &n);
    if (rc < 0)
        return fail_rc("warm drop", rc);
    if (json)
        printf("{\"dropped\": %" PRIu64 "}\n", n);
    else
        printf("%" PRIu64 " warm-start entr%s dropped\n", n, n == 1 ? "y" : "ies");
    return 0;
}

static int cmd_stats(la_client *c, int json)
{
    return show_table(c, la_stats, "stats", json, NULL, 1);
}

/* ---- metrics: the Prometheus text exposition format (0.0.4) ---- */

typedef struct metric_def {
    const char *stat; /* name in the Stats reply */
    const char *name; /* metric family */
    const char *type; /* counter, gauge */
    const char *help;
    double scale; /* value = stat * scale */
} metric_def;

static const metric_def metric_defs[] = {
    {"calls", "liteattn_calls_total", "counter", "Attention requests received.", 1},
    {"call_errors", "liteattn_calls_refused_total", "counter",
     "Attention requests refused before running (validation, limits).", 1},
    {"calls_completed", "liteattn_calls_completed_total", "counter",
     "Attention calls that finished successfully.", 1},
    {"calls_failed", "liteattn_calls_failed_total", "counter",
     "Attention calls that finished with an error.", 1},
    {"calls_inflight", "liteattn_calls_inflight", "gauge", "Attention calls queued or running.", 1},
    {"tiles_total", "liteattn_tiles_total", "counter", "Attention tiles of the finished calls.", 1},
    {"tiles_computed", "liteattn_tiles_computed_total", "counter", "Attention tiles computed.", 1},
    {"tiles_skipped", "liteattn_tiles_skipped_total", "counter", "Attention tiles skipped.", 1},
    {"layer_restarts", "liteattn_layer_restarts_total", "counter",
     "Layers started over dense because a call's step was below the layer's last step.", 1},
    {"compute_ns", "liteattn_attention_seconds_total", "counter",
     "Time finished attention calls spent computing.", 1e-9},
    {"queue_ns", "liteattn_queue_seconds_total", "counter",
     "Time finished attention calls waited for a worker.", 1e-9},
    {"sessions", "liteattn_sessions", "gauge", "Open sessions.", 1},
    {"sessions_detached", "liteattn_sessions_detached", "gauge",
     "Open sessions no connection holds (in their grace period).", 1},
    {"sessions_opened", "liteattn_sessions_opened_total", "counter", "Sessions opened.", 1},
    {"sessions_closed", "liteattn_sessions_closed_total", "counter",
     "Sessions closed by their clients.", 1},
    {"sessions_evicted", "liteattn_sessions_evicted_total", "counter",
     "Idle sessions freed under the mask memory cap.", 1},
    {"sessions_expired", "liteattn_sessions_expired_total", "counter",
     "Sessions freed after the idle TTL.", 1},
    {"sessions_grace_expired", "liteattn_sessions_grace_expired_total", "counter",
     "Detached sessions freed after the grace period.", 1},
    {"mask_bytes", "liteattn_mask_bytes", "gauge", "Skip-mask memory held.", 1},
    {"buffers", "liteattn_buffers", "gauge", "Registered buffers.", 1},
    {"buffer_bytes", "liteattn_buffer_bytes", "gauge", "Bytes of the registered buffers.", 1},
    {"buffers_registered", "liteattn_buffers_registered_total", "counter", "Buffers registered.",
     1},
    {"buffers_unregistered", "liteattn_buffers_unregistered_total", "counter",
     "Buffers unregistered.", 1},
    {"fatal", "liteattn_fatal", "gauge", "1 once a sticky GPU error happened.", 1},
    {"guard_checks", "liteattn_guard_checks_total", "counter",
     "Attention calls the quality guardrail checked.", 1},
    {"guard_restored", "liteattn_guard_restored_total", "counter",
     "Mask rows the quality guardrail restored (they lost more than the budget).", 1},
    {"guard_tiles", "liteattn_guard_tiles_total", "counter",
     "Tiles the guardrail's dense samples computed.", 1},
    {"warm_starts", "liteattn_warm_starts_total", "counter",
     "Sessions that started from stored masks of earlier generations.", 1},
    {"warm_deposits", "liteattn_warm_deposits_total", "counter",
     "Generations deposited in the warm-start store.", 1},
    {"warm_bytes", "liteattn_warm_store_bytes", "gauge", "Bytes held by the warm-start store.",
     1},
    {"warm_evicted", "liteattn_warm_evicted_total", "counter",
     "Generations the warm-start store let go under its per-user limit.", 1},
    {"warm_files_refused", "liteattn_warm_files_refused_total", "counter",
     "Warm-store files refused at start (corrupt, truncated, foreign).", 1},
    {"server.connections", "liteattn_connections", "gauge", "Open connections.", 1},
    {"server.connections_total", "liteattn_connections_total", "counter", "Connections accepted.",
     1},
    {"server.connections_rejected", "liteattn_connections_rejected_total", "counter",
     "Connections refused (per-user limit, out of descriptors).", 1},
    {"server.frames_in", "liteattn_frames_received_total", "counter", "Frames received.", 1},
    {"server.frames_out", "liteattn_frames_sent_total", "counter", "Frames sent.", 1},
    {"server.bytes_in", "liteattn_received_bytes_total", "counter", "Bytes received.", 1},
    {"server.bytes_out", "liteattn_sent_bytes_total", "counter", "Bytes sent.", 1},
    {"server.protocol_errors", "liteattn_protocol_errors_total", "counter",
     "Connections closed for framing or protocol errors.", 1},
    {"server.uptime_s", "liteattn_uptime_seconds", "gauge", "Seconds since the daemon started.", 1},
};
#define N_METRIC_DEFS (sizeof(metric_defs) / sizeof(metric_defs[0]))
#define ERRORS_PREFIX "server.errors."

/* A label value: \, " and newline escaped; bytes outside printable ASCII become '?' (label
 * values must be UTF-8, session keys are any bytes). */
static void label_value(const char *s)
{
    putchar('"');
    for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++) {
        if (*p == '\\' || *p == '"')
            printf("\\%c", *p);
        else if (*p == '\n')
            fputs("\\n", stdout);
        else
            putchar(*p >= 0x20 && *p < 0x7f ? *p : '?');
    }
    putchar('"');
}

static void family(const char *name, const char *type, const char *help)
{
    printf("# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A number as Prometheus reads it: integers exactly, others with 15 significant digits. */
static void sample_value(double v)
{
    if (v > -9e15 && v < 9e15 && v == (double)(int64_t)v)
        printf(" %lld\n", (long long)v);
    else
        printf(" %.15g\n", v);
}

static double cell_num(const la_table *t, size_t row, const char *col)
{
    for (size_t c = 0; c < la_table_cols(t); c++)
        if (!strcmp(la_table_col_name(t, c), col)) {
            const char *v = la_table_text(t, row, c);
            return v ? strtod(v, NULL) : 0;
        }
    return 0;
}

static const char *cell_text(const la_table *t, size_t row, const char *col)
{
    for (size_t c = 0; c < la_table_cols(t); c++)
        if (!strcmp(la_table_col_name(t, c), col))
            return la_table_text(t, row, c);
    return "";
}

/* The daemon's families: up, info, the known counters of the Stats table st, error replies by
 * code, and the counters this tool does not know yet. */
static void metrics_daemon(la_client *c, const la_table *st)
{
    family("liteattn_up", "gauge", "1 when the daemon answered.");
    printf("liteattn_up 1\n");
    family("liteattn_info", "gauge", "The daemon's version, protocol and backends (value 1).");
    printf("liteattn_info{version=");
    label_value(prop(c, "daemon.version"));
    printf(",protocol=");
    label_value(prop(c, "protocol"));
    printf(",backends=");
    label_value(prop(c, "backends"));
    printf("} 1\n");

    size_t rows = la_table_rows(st);
    for (size_t i = 0; i < N_METRIC_DEFS; i++) {
        const metric_def *m = &metric_defs[i];
        for (size_t r = 0; r < rows; r++) {
            int64_t v;
            if (strcmp(la_table_text(st, r, 0), m->stat) || la_table_int(st, r, "value", &v) < 0)
                continue;
            family(m->name, m->type, m->help);
            printf("%s", m->name);
            sample_value((double)v * m->scale);
            break;
        }
    }
    /* Error replies by code: one family, a label per code. */
    int first = 1;
    for (size_t r = 0; r < rows; r++) {
        const char *name = la_table_text(st, r, 0);
        int64_t v;
        if (strncmp(name, ERRORS_PREFIX, strlen(ERRORS_PREFIX)) ||
            la_table_int(st, r, "value", &v) < 0)
            continue;
        if (first)
            family("liteattn_errors_total", "counter", "Error replies sent, by error code.");
        first = 0;
        printf("liteattn_errors_total{code=");
        label_value(name + strlen(ERRORS_PREFIX));
        printf("}");
        sample_value((double)v);
    }
    /* Counters this tool does not know yet (a newer daemon): one untyped family. */
    first = 1;
    for (size_t r = 0; r < rows; r++) {
        const char *name = la_table_text(st, r, 0);
        int64_t v;
        int known = !strncmp(name, ERRORS_PREFIX, strlen(ERRORS_PREFIX));
        for (size_t i = 0; i < N_METRIC_DEFS && !known; i++)
            known = !strcmp(name, metric_defs[i].stat);
        if (known || la_table_int(st, r, "value", &v) < 0)
            continue;
        if (first)
            family("liteattn_stat", "untyped", "Other daemon counters, by their stats name.");
        first = 0;
        printf("liteattn_stat{name=");
        label_value(name);
        printf("}");
        sample_value((double)v);
    }
}

/* Per session of the SessionList table ss (those this user may see; root sees all). */
static void metrics_sessions(const la_table *ss)
{
    static const struct {
        const char *col, *name, *type, *help;
    } sess_defs[] = {
        {"live_fraction", "liteattn_session_live_fraction", "gauge",
         "Fraction of the session's attention tiles still computed."},
        {"calls", "liteattn_session_calls_total", "counter", "Attention calls of the session."},
        {"restarts", "liteattn_session_restarts_total", "counter",
         "Layers of the session started over dense (a step below the layer's last step)."},
        {"mask_bytes", "liteattn_session_mask_bytes", "gauge", "Skip-mask memory of the session."},
        {"attached", "liteattn_session_attached", "gauge",
         "1 when a connection holds the session, 0 in its grace period."},
        {"idle_s", "liteattn_session_idle_seconds", "gauge",
         "Seconds since the session's last call."},
        {"warm_generations", "liteattn_session_warm_generations", "gauge",
         "Generations the session's warm seed combines (0: it started cold)."},
        {"guard_restored", "liteattn_session_guard_restored_total", "counter",
         "Mask rows of the session the quality guardrail restored."},
    };
    size_t n_sess = la_table_rows(ss);
    for (size_t i = 0; i < sizeof(sess_defs) / sizeof(sess_defs[0]) && n_sess; i++) {
        family(sess_defs[i].name, sess_defs[i].type, sess_defs[i].help);
        for (size_t r = 0; r < n_sess; r++) {
            printf("%s{session=", sess_defs[i].name);
            label_value(cell_text(ss, r, "id"));
            printf(",key=");
            label_value(cell_text(ss, r, "key"));
            printf(",uid=");
            label_value(cell_text(ss, r, "uid"));
            printf(",device=");
            label_value(cell_text(ss, r, "device"));
            printf("}");
            sample_value(cell_num(ss, r, sess_defs[i].col));
        }
    }
}

/* Per user: sums over the sessions of ss, in order of first appearance. */
static void metrics_users(const la_table *ss)
{
    size_t n_sess = la_table_rows(ss);
    static const struct {
        const char *name, *help;
    } user_defs[] = {
        {"liteattn_user_sessions", "Open sessions of the user."},
        {"liteattn_user_sessions_detached", "Open sessions of the user no connection holds."},
        {"liteattn_user_mask_bytes", "Skip-mask memory of the user's sessions."},
    };
    for (size_t i = 0; i < sizeof(user_defs) / sizeof(user_defs[0]) && n_sess; i++) {
        family(user_defs[i].name, "gauge", user_defs[i].help);
        for (size_t r = 0; r < n_sess; r++) {
            const char *uid = cell_text(ss, r, "uid");
            int seen = 0;
            for (size_t q = 0; q < r && !seen; q++)
                seen = !strcmp(cell_text(ss, q, "uid"), uid);
            if (seen)
                continue;
            double sum = 0;
            for (size_t q = r; q < n_sess; q++) {
                if (strcmp(cell_text(ss, q, "uid"), uid))
                    continue;
                sum += i == 0   ? 1
                       : i == 1 ? cell_num(ss, q, "attached") == 0
                                : cell_num(ss, q, "mask_bytes");
            }
            printf("%s{uid=", user_defs[i].name);
            label_value(uid);
            printf("}");
            sample_value(sum);
        }
    }
}

static int cmd_metrics(la_client *c)
{
    la_table *st, *ss;
    int rc = la_stats(c, &st);
    if (rc < 0)
        return fail_rc("metrics", rc);
    rc = la_sessions(c, &ss);
    if (rc < 0) {
        la_table_free(st);
        return fail_rc("metrics", rc);
    }
    metrics_daemon(c, st);
    metrics_sessions(ss);
    metrics_users(ss);
    la_table_free(st);
    la_table_free(ss);
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int cmd_ping(la_client *c, long count, int json)
{
    uint64_t *rtt = malloc((size_t)count * sizeof(uint64_t));
    if (!rtt) {
        fprintf(stderr, "%s: out of memory\n", prog);
        return 1;
    }
    for (long i = 0; i < count; i++) {
        int rc = la_ping(c, &rtt[i]);
        if (rc < 0) {
            free(rtt);
            return fail_rc("ping", rc);
        }
    }
    qsort(rtt, (size_t)count, sizeof(uint64_t), cmp_u64);
    double min = rtt[0] / 1e3, med, p99;
    if (count % 2)
        med = rtt[count / 2] / 1e3;
    else
        med = (rtt[count / 2 - 1] + rtt[count / 2]) / 2e3;
    long i99 = (long)((count - 1) * 0.99 + 0.5);
    p99 = rtt[i99] / 1e3;
    double max = rtt[count - 1] / 1e3;
    if (json)
        printf("{\"count\": %ld, \"min_us\": %.2f, \"median_us\": %.2f, \"p99_us\": %.2f, "
               "\"max_us\": %.2f}\n",
               count, min, med, p99, max);
    else
        printf("%ld pings: min %.1f us, median %.1f us, p99 %.1f us, max %.1f us\n", count, min,
               med, p99, max);
    free(rtt);
    return 0;
}

int main(int argc, char **argv)
{
    const char *sock = NULL, *cmd = NULL;
    int json = 0;
    long count = 1000;
    int have_n = 0, all = 0, n_args = 0;
    char *args[2] = {NULL, NULL};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--json")) {
            json = 1;
        } else if (!strcmp(a, "--socket") || !strcmp(a, "-s")) {
            if (++i >= argc) {
                fprintf(stderr, "%s: %s needs a path\n", prog, a);
                return 2;
            }
            sock = argv[i];
        } else if (!strncmp(a, "--socket=", 9)) {
            sock = a + 9;
        } else if (!strcmp(a, "-n") || !strcmp(a, "--count")) {
            if (++i >= argc) {
                fprintf(stderr, "%s: %s needs a number\n", prog, a);
                return 2;
            }
            char *end;
            errno = 0;
            count = strtol(argv[i], &end, 10);
            if (errno || *end || count < 1 || count > 10000000) {
                fprintf(stderr, "%s: -n wants a count from 1 to 10000000, not \"%s\"\n", prog,
                        argv[i]);
                return 2;
            }
            have_n = 1;
        } else if (!strcmp(a, "--all") && cmd && !strcmp(cmd, "warm")) {
            all = 1;
        } else if (a[0] == '-') {
            fprintf(stderr, "%s: unknown option %s (see --help)\n", prog, a);
            return 2;
        } else if (!cmd) {
            cmd = a;
        } else if (!strcmp(cmd, "warm") && n_args < 2) {
            args[n_args++] = argv[i];
        } else {
            fprintf(stderr, "%s: unexpected argument \"%s\" (see --help)\n", prog, a);
            return 2;
        }
    }
    if (!cmd) {
        usage(stderr);
        return 2;
    }
    if (strcmp(cmd, "status") && strcmp(cmd, "sessions") && strcmp(cmd, "stats") &&
        strcmp(cmd, "metrics") && strcmp(cmd, "ping") && strcmp(cmd, "warm")) {
        fprintf(stderr,
                "%s: unknown command \"%s\" (status, sessions, stats, metrics, ping, warm)\n",
                prog, cmd);
        return 2;
    }
    if (!strcmp(cmd, "warm") &&
        ((n_args >= 1 && strcmp(args[0], "drop")) || (n_args == 1 && !all) ||
         (n_args == 2 && all) || (all && n_args == 0))) {
        fprintf(stderr, "%s: warm takes nothing, \"drop KEY\" or \"drop --all\"\n", prog);
        return 2;
    }
    if (json && !strcmp(cmd, "metrics")) {
        fprintf(stderr, "%s: metrics has one format, the Prometheus text format (no --json)\n",
                prog);
        return 2;
    }
    if (have_n && strcmp(cmd, "ping")) {
        fprintf(stderr, "%s: -n applies to ping only\n", prog);
        return 2;
    }
    char def[4096];
    if (!sock) {
        if (la_default_socket_path(def, sizeof(def)) < 0) {
            fprintf(stderr, "%s: %s\n", prog, la_last_error_message());
            return 2;
        }
        sock = def;
    }
    la_client *c;
    int rc = la_connect(sock, "liteattnctl", &c);
    if (rc < 0 && !strcmp(cmd, "metrics")) {
        /* A scrape still gets an answer: the daemon is down. */
        family("liteattn_up", "gauge", "1 when the daemon answered.");
        printf("liteattn_up 0\n");
        fflush(stdout);
    }
    if (rc == LA_ECONN) {
        fprintf(stderr, "%s: %s: is liteattnd running?\n", prog, la_last_error_message());
        return 1;
    }
    if (rc < 0)
        return fail_rc("connect", rc);
    int st;
    if (!strcmp(cmd, "status"))
        st = cmd_status(c, sock, json);
    else if (!strcmp(cmd, "sessions"))
        st = cmd_sessions(c, json);
    else if (!strcmp(cmd, "stats"))
        st = cmd_stats(c, json);
    else if (!strcmp(cmd, "metrics"))
        st = cmd_metrics(c);
    else if (!strcmp(cmd, "warm"))
        st = cmd_warm(c, json, n_args, args, all);
    else
        st = cmd_ping(c, count, json);
    la_disconnect(c);
    return st;
}
