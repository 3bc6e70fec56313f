/* liteattnctl — look at a running liteattnd: status, sessions, stats, ping. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "liteattn.h"

static const char *prog = "liteattnctl";

static void usage(FILE *f)
{
    fprintf(f,
            "usage: %s [--socket PATH] [--json] COMMAND\n"
            "\n"
            "commands:\n"
            "  status          daemon version, protocol, backends, devices and limits\n"
            "  sessions        open sessions visible to this user\n"
            "  stats           daemon counters\n"
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
            if (*p < 0x20)
                printf("\\u%04x", *p);
            else
                putchar(*p);
        }
    }
    putchar('"');
}

/* A cell that is a plain JSON number (integer or decimal) is written as is. */
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

static const char *const limit_names[] = {"max_frame",       "max_inflight",
                                          "max_buffers",     "max_sessions",
                                          "max_mask_bytes",  "max_connections",
                                          "session_grace_s", "session_ttl_s"};
#define N_LIMITS (sizeof(limit_names) / sizeof(limit_names[0]))

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
        const char *p = backends;
        int first = 1;
        while (*p) {
            const char *comma = strchr(p, ',');
            size_t n = comma ? (size_t)(comma - p) : strlen(p);
            char b[256];
            snprintf(b, sizeof(b), "%.*s", (int)n, p);
            printf("%s", first ? "" : ", ");
            json_str(b);
            first = 0;
            p += n + (comma ? 1 : 0);
        }
        printf("], \"devices\": [");
        p = devices;
        first = 1;
        while (*p) {
            const char *eol = strchr(p, '\n');
            size_t n = eol ? (size_t)(eol - p) : strlen(p);
            char line[512], uuid[512] = "", backend[512] = "";
            snprintf(line, sizeof(line), "%.*s", (int)n, p);
            const char *name = "";
            char *sp1 = strchr(line, ' ');
            if (sp1) {
                *sp1 = 0;
                char *sp2 = strchr(sp1 + 1, ' ');
                if (sp2) {
                    *sp2 = 0;
                    name = sp2 + 1;
                }
                snprintf(backend, sizeof(backend), "%s", sp1 + 1);
            }
            snprintf(uuid, sizeof(uuid), "%s", line);
            printf("%s{\"uuid\": ", first ? "" : ", ");
            json_str(uuid);
            printf(", \"backend\": ");
            json_str(backend);
            printf(", \"name\": ");
            json_str(name);
            printf("}");
            first = 0;
            p += n + (eol ? 1 : 0);
        }
        printf("], \"limits\": {");
        first = 1;
        for (size_t i = 0; i < N_LIMITS; i++) {
            char key[64];
            snprintf(key, sizeof(key), "limit.%s", limit_names[i]);
            const char *v = la_client_property(c, key);
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
        while (*p) {
            const char *eol = strchr(p, '\n');
            size_t n = eol ? (size_t)(eol - p) : strlen(p);
            char line[512];
            snprintf(line, sizeof(line), "%.*s", (int)n, p);
            char *backend = strchr(line, ' '), *name = NULL;
            if (backend) {
                *backend++ = 0;
                name = strchr(backend, ' ');
                if (name)
                    *name++ = 0;
            }
            if (!backend || !name)
                printf("%-10s %s\n", first ? "devices" : "", line);
            else if (!strcmp(line, backend))
                printf("%-10s %s: %s\n", first ? "devices" : "", backend, name);
            else
                printf("%-10s %s: %s (%s)\n", first ? "devices" : "", backend, name, line);
            first = 0;
            p += n + (eol ? 1 : 0);
        }
    }
    int first = 1;
    for (size_t i = 0; i < N_LIMITS; i++) {
        char key[64];
        snprintf(key, sizeof(key), "limit.%s", limit_names[i]);
        const char *v = la_client_property(c, key);
        if (!v)
            continue;
        printf("%-10s %-16s %s\n", first ? "limits" : "", limit_names[i], v);
        first = 0;
    }
    return 0;
}

/* ---- tables ---- */
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
                if (!strcmp(name, "attached"))
                    printf("%s", v && !strcmp(v, "1") ? "true" : "false");
                else if (strcmp(name, "key") && strcmp(name, "device") && is_number(v))
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
            size_t n = strlen(la_table_text(t, r, col));
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
            const char *v = la_table_text(t, r, col);
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

static int cmd_sessions(la_client *c, int json)
{
    la_table *t;
    int rc = la_sessions(c, &t);
    if (rc < 0)
        return fail_rc("sessions", rc);
    if (!json && la_table_rows(t) == 0)
        printf("no open sessions\n");
    else
        print_table(t, json, 0);
    la_table_free(t);
    return 0;
}

static int cmd_stats(la_client *c, int json)
{
    la_table *t;
    int rc = la_stats(c, &t);
    if (rc < 0)
        return fail_rc("stats", rc);
    print_table(t, json, 1);
    la_table_free(t);
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
               "\"max_us\": %.2f}\n", count, min, med, p99, max);
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
    int have_n = 0;
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
        } else if (a[0] == '-') {
            fprintf(stderr, "%s: unknown option %s (see --help)\n", prog, a);
            return 2;
        } else if (!cmd) {
            cmd = a;
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
        strcmp(cmd, "ping")) {
        fprintf(stderr, "%s: unknown command \"%s\" (status, sessions, stats, ping)\n", prog,
                cmd);
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
    else
        st = cmd_ping(c, count, json);
    la_disconnect(c);
    return st;
}
