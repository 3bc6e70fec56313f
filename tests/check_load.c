/*
 * check_load.c — many clients against one daemon (CPU backend): every valid request answered
 * correctly, every invalid one with the right error, and no fd or memory growth afterwards.
 *
 * LA_LOAD_CLIENTS client processes (default 32) each run LA_LOAD_REQUESTS requests (default
 * 1000; 150 under a sanitizer build, LA_TEST_SANITIZER set) through libliteattn plus a raw
 * connection of their own, in a fixed mix per 20 requests:
 *   8 attention calls (B1 Sq48 Sk48 H2 D64 f32, skip mode with tau = -inf so the result is
 *     exact; every 4th compared with la_ref_attn_fwd on the same inputs; each 5th round three
 *     of them pipelined), 2 pings, 2 session infos (calls counted by the daemon = calls made),
 *   8 invalid: q with the wrong head count (LA_EINVAL), o past the end of its buffer
 *     (LA_ERANGE), bf16 tensors on an f32 session (LA_EINVAL), layer out of range (LA_EINVAL),
 *     an unknown session (raw, LA_ENOENT), a mask read of an unknown session (raw, LA_ENOENT),
 *     a buffer id of another connection (raw, LA_ENOENT), an attach to a key nobody opened
 *     (raw, LA_ENOENT).
 * The daemon's open fds (/proc/<pid>/fd) and VmRSS are taken after a warm-up client ran the
 * same mix, and again once every client has gone: the fd count must be back exactly, RSS
 * within LOAD_RSS_SLACK_KIB = 16 MiB (not checked under a sanitizer, whose quarantine keeps
 * freed memory on purpose; malloc arenas of the worker threads and the loop keep freed
 * memory; 32 connections' buffers were 32 x 192 KiB of mappings, all unmapped).
 * Throughput and latency are printed (bench/RESULTS.md quotes a full-size run:
 * LA_LOAD_REQUESTS=2000 build/tests/check_load). The daemon is the case's td fixture.
 */
#include <check.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "la_attn.h"
#include "liteattn.h"
#include "rawproto.h"
#include "testutil.h"
#include "testutil_daemon.h"
#include "testutil_proc.h"

#define LOAD_RSS_SLACK_KIB (16 * 1024)
#define B_ 1
#define S_ 48
#define H_ 2
#define D_ 64
#define TBYTES ((size_t)B_ * S_ * H_ * D_ * 4)
#define NLAT 512

typedef struct client_result {
    int done;
    tu_failures fail;
    long valid, invalid, pings, infos, compared;
    double lat_sum_us, lat_max_us;
    int n_lat;
    float lat_us[NLAT];
} client_result;

static double now_us(void) { return tu_now_s() * 1e6; }

#define FAIL(res, ...) tu_fail(&(res)->fail, __VA_ARGS__)

static void set_qkvo(la_attn *a, la_buffer *b, la_dtype dt, int64_t heads, uint64_t o_off)
{
    int64_t sh[4] = {B_, S_, heads, D_};
    la_attn_set_tensor(a, LA_TENSOR_Q, b, 0, dt, 4, sh, NULL);
    la_attn_set_tensor(a, LA_TENSOR_K, b, TBYTES, dt, 4, sh, NULL);
    la_attn_set_tensor(a, LA_TENSOR_V, b, 2 * TBYTES, dt, 4, sh, NULL);
    la_attn_set_tensor(a, LA_TENSOR_O, b, o_off, dt, 4, sh, NULL);
}

/* Compares the daemon's O (in the buffer) with the reference on the same Q/K/V. */
static int compare_ref(const char *base, double *ret_err)
{
    static float o_ref[B_ * S_ * H_ * D_];
    la_attn_params p;
    tu_params(&p, base, base + TBYTES, base + 2 * TBYTES, o_ref, NULL, NULL, B_, S_, S_, H_, D_,
              LA_DTYPE_F32, 64, 64);
    p.mode = LA_MODE_DENSE;
    if (la_ref_attn_fwd(&p) != 0)
        return -1;
    const float *o = (const float *)(base + 3 * TBYTES);
    double num = 0, den = 0;
    for (size_t i = 0; i < B_ * S_ * H_ * D_; i++) {
        double d = (double)o[i] - (double)o_ref[i];
        num += d * d;
        den += (double)o_ref[i] * o_ref[i];
    }
    *ret_err = den > 0 ? sqrt(num / den) : sqrt(num);
    return 0;
}

static void client_main(const char *sock, int idx, int requests, client_result *res)
{
    tu_rng rng;
    tu_rng_init(&rng, 1000 + (uint64_t)idx);
    char key[64];
    snprintf(key, sizeof key, "load-%d", idx);
    la_client *c = NULL;
    int rc = la_connect(sock, "check_load", &c);
    if (rc != 0) {
        FAIL(res, "client %d: la_connect: %s", idx, la_strerror(rc));
        return;
    }
    la_session_config *cfg;
    la_session_config_new(&cfg);
    la_session_config_set_geometry(cfg, 2, H_, D_, LA_DTYPE_F32, S_, S_, 1, 1);
    la_session_config_set_threshold(cfg, -INFINITY);
    la_session_config_set_mode(cfg, LA_MODE_SKIP);
    la_session *s = NULL;
    rc = la_session_open(c, key, cfg, &s);
    la_session_config_free(cfg);
    if (rc != 0) {
        FAIL(res, "client %d: la_session_open: %s (%s)", idx, la_strerror(rc),
             la_last_error_message());
        la_disconnect(c);
        return;
    }
    la_buffer *b = NULL;
    rc = la_buffer_new_host(c, 4 * TBYTES, &b);
    if (rc != 0) {
        FAIL(res, "client %d: la_buffer_new_host: %s", idx, la_strerror(rc));
        la_disconnect(c);
        return;
    }
    char *base = la_buffer_host_ptr(b);
    tu_fill(&rng, base, LA_DTYPE_F32, 3 * (int64_t)(TBYTES / 4), 1.0);

    /* The raw connection and a buffer of its own (for "another connection's buffer"). */
    int raw = raw_connect(sock);
    int64_t raw_buf = -1;
    if (raw >= 0) {
        int mfd = raw_memfd(4096);
        raw_buf = raw_register(raw, mfd, 4096);
        close(mfd);
    }
    if (raw < 0 || raw_buf <= 0) {
        FAIL(res, "client %d: raw connection/buffer failed (%lld)", idx, (long long)raw_buf);
        la_disconnect(c);
        return;
    }

    la_attn *a;
    la_attn_new(&a);
    la_attn *bad;
    la_attn_new(&bad);
    uint64_t calls = 0;
    for (int i = 0; i < requests; i++) {
        int k = i % 20;
        if (k < 8) {
            set_qkvo(a, b, LA_DTYPE_F32, H_, 3 * TBYTES);
            la_attn_set_position(a, (uint32_t)(i & 1), (uint32_t)(i / 20), 0);
            if (k == 0 && (i / 20) % 5 == 4) {
                /* Three pipelined calls on the two layers (same O: the last one's is checked
                 * by nobody; what matters is that all three are answered). */
                la_call *cl[3];
                int n = 0;
                double t0 = now_us();
                for (int j = 0; j < 3; j++) {
                    la_attn_set_position(a, (uint32_t)(j & 1), (uint32_t)(i / 20), 0);
                    rc = la_attn_submit(s, a, NULL, NULL, &cl[n]);
                    if (rc != 0)
                        FAIL(res, "client %d: pipelined submit: %s", idx, la_strerror(rc));
                    else
                        n++;
                }
                for (int j = 0; j < n; j++) {
                    rc = la_call_wait(cl[j], 30000);
                    if (rc != 0)
                        FAIL(res, "client %d: pipelined call: %s", idx, la_strerror(rc));
                    else
                        calls++, res->valid++;
                    la_call_free(cl[j]);
                }
                double dt = (now_us() - t0) / 3;
                res->lat_sum_us += dt * 3;
                continue;
            }
            double t0 = now_us();
            rc = la_attn_run(s, a, NULL);
            double dt = now_us() - t0;
            if (rc != 0) {
                FAIL(res, "client %d: valid call %d: %s (%s)", idx, i, la_strerror(rc),
                     la_last_error_message());
                continue;
            }
            calls++, res->valid++;
            res->lat_sum_us += dt;
            if (dt > res->lat_max_us)
                res->lat_max_us = dt;
            if (res->n_lat < NLAT)
                res->lat_us[res->n_lat++] = (float)dt;
            if (k % 4 == 0) {
                double err = -1;
                if (compare_ref(base, &err) != 0 || !(err < 1e-5))
                    FAIL(res, "client %d: call %d: O differs from the reference (rel L2 %g)", idx,
                         i, err);
                res->compared++;
            }
        } else if (k < 10) {
            uint64_t rtt;
            rc = la_ping(c, &rtt);
            if (rc != 0)
                FAIL(res, "client %d: ping: %s", idx, la_strerror(rc));
            res->pings++;
        } else if (k < 12) {
            uint64_t n = 0;
            double live[2];
            rc = la_session_info(s, live, 2, &n);
            if (rc != 0 || n != calls)
                FAIL(res, "client %d: session info: %s, %llu calls (made %llu)", idx,
                     la_strerror(rc), (unsigned long long)n, (unsigned long long)calls);
            res->infos++;
        } else {
            int want, got;
            const char *what;
            raw_attn x;
            switch (k) {
            case 12:
                what = "q with the wrong head count";
                want = LA_EINVAL;
                set_qkvo(bad, b, LA_DTYPE_F32, H_ + 1, 3 * TBYTES);
                la_attn_set_position(bad, 0, 0, 0);
                got = la_attn_run(s, bad, NULL);
                break;
            case 13:
                what = "o past the end of its buffer";
                want = LA_ERANGE;
                set_qkvo(bad, b, LA_DTYPE_F32, H_, 3 * TBYTES + 64);
                la_attn_set_position(bad, 0, 0, 0);
                got = la_attn_run(s, bad, NULL);
                break;
            case 14:
                what = "bf16 tensors on an f32 session";
                want = LA_EINVAL;
                set_qkvo(bad, b, LA_DTYPE_BF16, H_, 3 * TBYTES);
                la_attn_set_position(bad, 0, 0, 0);
                got = la_attn_run(s, bad, NULL);
                break;
            case 15:
                what = "layer out of range";
                want = LA_EINVAL;
                set_qkvo(bad, b, LA_DTYPE_F32, H_, 3 * TBYTES);
                la_attn_set_position(bad, 2, 0, 0);
                got = la_attn_run(s, bad, NULL);
                break;
            case 16:
                what = "an unknown session (raw)";
                want = LA_ENOENT;
                raw_attn_init(&x, 1u << 30, (uint64_t)raw_buf, 1, H_);
                got = raw_rc(raw, &x.req);
                break;
            case 17:
                what = "a mask read of an unknown session (raw)";
                want = LA_ENOENT;
                got = raw_mask_read(raw, (1u << 30) + 1);
                break;
            case 18: {
                what = "another connection's buffer (raw)";
                want = LA_ENOENT;
                int64_t sid = 0;
                la_session_get(s, "id", &sid);
                raw_attn_init(&x, (uint64_t)sid, la_buffer_id(b), S_, H_);
                got = raw_rc(raw, &x.req);
                break;
            }
            default:
                what = "an attach to a key nobody opened (raw)";
                want = LA_ENOENT;
                got = raw_attach(raw, "load-nobody");
                break;
            }
            if (got != want)
                FAIL(res, "client %d: %s: got %s, want %s", idx, what, la_err_name(got),
                     la_err_name(want));
            res->invalid++;
        }
    }
    la_attn_free(a);
    la_attn_free(bad);
    close(raw);
    la_buffer_unregister(b);
    rc = la_session_close(s);
    if (rc != 0)
        FAIL(res, "client %d: la_session_close: %s", idx, la_strerror(rc));
    la_disconnect(c);
    res->done = 1;
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Runs n clients (processes) of requests each; returns the wall time in seconds. */
static double run_clients(const char *sock, int n, int requests, client_result *res)
{
    double t0 = now_us();
    pid_t *pids = calloc((size_t)n, sizeof *pids);
    for (int i = 0; i < n; i++) {
        pids[i] = fork();
        ck_assert_int_ge(pids[i], 0);
        if (pids[i] == 0) {
            client_main(sock, i, requests, &res[i]);
            _exit(0);
        }
    }
    for (int i = 0; i < n; i++) {
        int st;
        ck_assert_int_eq(waitpid(pids[i], &st, 0), pids[i]);
        ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "client %d exited with %d", i, st);
    }
    free(pids);
    return (now_us() - t0) / 1e6;
}

/* Waits (up to 4 s) until the daemon holds want_fds descriptors again. */
static void wait_fds(pid_t pid, int want_fds)
{
    for (int i = 0; i < 400 && proc_fd_count(pid) != want_fds; i++)
        usleep(10000);
}

TD_FIXTURE(load_up, "--max-connections-per-user", "256", "--log-level", "warn")

START_TEST(test_load_mixed)
{
    int n = tu_env_int("LA_LOAD_CLIENTS", 32);
    int requests = tu_env_int("LA_LOAD_REQUESTS", getenv("LA_TEST_SANITIZER") ? 150 : 1000);
    const td_daemon *d = &td_fx;
    client_result *res = tu_shared_new(sizeof(client_result) * (size_t)(n + 1));

    /* Warm-up: one client runs the same mix, so that the baseline includes what the first
     * requests allocate for good (loop structures, arenas of the worker threads). */
    run_clients(d->socket, 1, 40, &res[n]);
    ck_assert_msg(res[n].done && res[n].fail.n == 0, "warm-up client: %s", res[n].fail.first);
    usleep(200000);
    int fd0 = proc_fd_count(d->pid);
    long rss0 = proc_rss_kib(d->pid);
    ck_assert_int_gt(fd0, 0);
    memset(res, 0, sizeof(client_result) * (size_t)n);

    double wall = run_clients(d->socket, n, requests, res);

    long valid = 0, invalid = 0, pings = 0, infos = 0, compared = 0, total_lat_n = 0;
    double lat_sum = 0, lat_max = 0;
    float *lat = malloc(sizeof(float) * NLAT * (size_t)n);
    for (int i = 0; i < n; i++) {
        ck_assert_msg(res[i].done, "client %d did not finish: %s", i, res[i].fail.first);
        ck_assert_msg(res[i].fail.n == 0, "client %d: %d failures, first: %s", i, res[i].fail.n,
                      res[i].fail.first);
        valid += res[i].valid, invalid += res[i].invalid, pings += res[i].pings;
        infos += res[i].infos, compared += res[i].compared;
        lat_sum += res[i].lat_sum_us;
        if (res[i].lat_max_us > lat_max)
            lat_max = res[i].lat_max_us;
        memcpy(lat + total_lat_n, res[i].lat_us, sizeof(float) * (size_t)res[i].n_lat);
        total_lat_n += res[i].n_lat;
    }
    qsort(lat, (size_t)total_lat_n, sizeof(float), cmp_float);
    long total = valid + invalid + pings + infos;
    printf("load: %d clients x %d requests: %ld requests in %.2f s = %.0f requests/s "
           "(%ld attention calls = %.0f/s, %ld compared with the reference, %ld invalid, "
           "%ld pings, %ld infos); attention latency p50 %.2f ms, p99 %.2f ms, max %.2f ms\n",
           n, requests, total, wall, total / wall, valid, valid / wall, compared, invalid, pings,
           infos, total_lat_n ? lat[total_lat_n / 2] / 1e3 : 0,
           total_lat_n ? lat[(size_t)(total_lat_n * 0.99)] / 1e3 : 0, lat_max / 1e3);
    free(lat);

    wait_fds(d->pid, fd0);
    int fd1 = proc_fd_count(d->pid);
    long rss1 = proc_rss_kib(d->pid);
    printf("load: daemon fds %d -> %d, VmRSS %ld -> %ld KiB (bound +%d KiB)\n", fd0, fd1, rss0,
           rss1, LOAD_RSS_SLACK_KIB);
    ck_assert_int_eq(fd1, fd0);
    /* ASan's quarantine holds freed memory on purpose: only the fds count there. */
    if (!getenv("LA_TEST_SANITIZER"))
        ck_assert_msg(rss1 <= rss0 + LOAD_RSS_SLACK_KIB, "daemon RSS grew from %ld to %ld KiB",
                      rss0, rss1);

    /* The daemon holds no session or buffer of the clients any more. */
    int raw = raw_connect(d->socket);
    ck_assert_int_ge(raw, 0);
    ck_assert_int_eq(raw_list_count(raw), 0);
    close(raw);
    tu_shared_free(res, sizeof(client_result) * (size_t)(n + 1));
}
END_TEST

int main(void)
{
    Suite *s = suite_create("load");
    TCase *tc = tcase_create("load");
    tcase_set_timeout(tc, 300);
    tcase_add_checked_fixture(tc, load_up, td_fx_down);
    tcase_add_test(tc, test_load_mixed);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
