/*
 * check_keys.c — session keys are client bytes: common/escape.c, and through liteattnd:
 *
 *   - a key with a control byte (newline, ESC) is refused with LA_EINVAL, so it cannot forge a
 *     line of the daemon's log;
 *   - a key with a NUL on the wire is refused (protobuf-c would cut it: "ab\0cd" and "ab"
 *     would be one session), and the connection goes on;
 *   - other bytes (UTF-8) are accepted and printed escaped, in the daemon's log and in
 *     liteattnctl's table.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "escape.h"
#include "rawproto.h"
#include "testutil.h"
#include "testutil_daemon.h"

START_TEST(escape_helper)
{
    char out[64];
    ck_assert_str_eq(esc_str(out, sizeof out, "plain-key_1.2"), "plain-key_1.2");
    ck_assert_str_eq(esc_str(out, sizeof out, "a\nb\x1b[31m\\\xc3\xa9"),
                     "a\\x0ab\\x1b[31m\\x5c\\xc3\\xa9");
    ck_assert_str_eq(esc_bytes(out, sizeof out, "a\0b", 3), "a\\x00b");
    ck_assert_str_eq(esc_str(out, sizeof out, NULL), "");
    /* truncated at a whole escape, always terminated */
    ck_assert_str_eq(esc_str(out, 6, "ab\ncd"), "ab");
    ck_assert_str_eq(esc_str(out, 7, "ab\ncd"), "ab\\x0a");
    ck_assert_uint_eq(strlen(esc_str(out, sizeof out, "\x01\x02\x03")), 12);
}
END_TEST

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *buf = calloc(1, 1 << 20);
    size_t n = buf ? fread(buf, 1, (1 << 20) - 1, f) : 0;
    (void)n;
    fclose(f);
    return buf;
}

START_TEST(control_bytes_refused)
{
    int fd = raw_connect(td_fx.socket);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(raw_session_open(fd, "x\nliteattnd: error: forged line", 1, 1, 128),
                     LA_EINVAL);
    ck_assert_int_eq(raw_session_open(fd, "x\x1b]0;owned\x07", 1, 1, 128), LA_EINVAL);
    ck_assert_int_eq(raw_session_open(fd, "tab\tkey", 1, 1, 128), LA_EINVAL);
    ck_assert_int_eq(raw_attach(fd, "x\nliteattnd: error: forged line"), LA_EINVAL);
    ck_assert_int_eq(raw_ping(fd), 0);
    close(fd);
}
END_TEST

START_TEST(nul_on_the_wire_refused)
{
    int fd = raw_connect(td_fx.socket);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_gt(raw_session_open(fd, "ab", 1, 1, 128), 0);
    /* SessionOpen and SessionAttach of "ab\0cd": packed with a stand-in byte, then patched. */
    for (int attach = 0; attach < 2; attach++) {
        Liteattn__SessionOpen so = LITEATTN__SESSION_OPEN__INIT;
        Liteattn__SessionAttach sa = LITEATTN__SESSION_ATTACH__INIT;
        so.key = sa.key = (char *)"abQcd";
        so.layers = 1, so.heads = 1, so.head_dim = 64, so.max_seq_q = 128;
        so.dtype = LITEATTN__DTYPE__DTYPE_F32;
        Liteattn__Request q = LITEATTN__REQUEST__INIT;
        q.id = 40 + (uint64_t)attach;
        if (attach) {
            q.body_case = LITEATTN__REQUEST__BODY_SESSION_ATTACH;
            q.session_attach = &sa;
        } else {
            q.body_case = LITEATTN__REQUEST__BODY_SESSION_OPEN;
            q.session_open = &so;
        }
        uint8_t *buf;
        size_t len;
        ck_assert_int_eq(raw_pack(&q, &buf, &len), 0);
        uint8_t *k = memmem(buf, len, "abQcd", 5);
        ck_assert_ptr_nonnull(k);
        k[2] = 0;
        ck_assert_int_eq(write(fd, buf, len), (ssize_t)len);
        free(buf);
        Liteattn__Reply *r = raw_recv(fd, 10000);
        ck_assert_ptr_nonnull(r);
        ck_assert_uint_eq(r->id, 40 + (uint64_t)attach);
        ck_assert_int_eq(raw_code(r), LA_EINVAL);
        ck_assert_msg(strstr(r->error->message, "NUL"), "message: %s", r->error->message);
        liteattn__reply__free_unpacked(r, NULL);
    }
    ck_assert_int_eq(raw_list_count(fd), 1); /* still only "ab" */
    ck_assert_int_eq(raw_ping(fd), 0);
    close(fd);
}
END_TEST

TD_FIXTURE(grace0_up, "--session-grace", "0")

START_TEST(printed_escaped)
{
    int fd = raw_connect(td_fx.socket);
    ck_assert_int_ge(fd, 0);
    const char *key = "caf\xc3\xa9-\\";
    ck_assert_int_gt(raw_session_open(fd, key, 1, 1, 128), 0);

    /* liteattnctl's table */
    const char *build = getenv("BUILD") ? getenv("BUILD") : "build";
    char cmd[512], out[8192] = "", ctl[256];
    snprintf(ctl, sizeof ctl, "%s/liteattnctl", build);
    if (access(ctl, X_OK) == 0) {
        snprintf(cmd, sizeof cmd, "%s --socket %s sessions", ctl, td_fx.socket);
        FILE *p = popen(cmd, "r");
        ck_assert_ptr_nonnull(p);
        size_t n = fread(out, 1, sizeof out - 1, p);
        out[n] = 0;
        ck_assert_int_eq(pclose(p), 0);
        ck_assert_msg(strstr(out, "caf\\xc3\\xa9-\\x5c"), "liteattnctl printed:\n%s", out);
        ck_assert_msg(!strstr(out, "\xc3\xa9"), "raw bytes in liteattnctl's table:\n%s", out);
    } else {
        printf("check_keys: %s not built; its table not checked\n", ctl);
    }

    /* the daemon's log: freed at the next tick once the connection is gone (grace 0) */
    close(fd);
    char *log = NULL;
    for (int i = 0; i < 50; i++) {
        free(log);
        log = slurp(td_fx.log);
        if (log && strstr(log, "freed, detached"))
            break;
        usleep(100 * 1000);
    }
    ck_assert_ptr_nonnull(log);
    ck_assert_msg(strstr(log, "key 'caf\\xc3\\xa9-\\x5c'"), "log:\n%s", log);
    ck_assert_msg(!strstr(log, "\xc3\xa9"), "raw bytes in the log:\n%s", log);
    free(log);
}
END_TEST

int main(void)
{
    tu_seed();
    Suite *s = suite_create("keys");
    TCase *tc = tcase_create("escape");
    tcase_add_test(tc, escape_helper);
    suite_add_tcase(s, tc);
    tc = tcase_create("daemon"); /* a daemon per case (td_fx) */
    tcase_set_timeout(tc, 30);
    tcase_add_checked_fixture(tc, td_fx_up, td_fx_down);
    tcase_add_test(tc, control_bytes_refused);
    tcase_add_test(tc, nul_on_the_wire_refused);
    suite_add_tcase(s, tc);
    tc = tcase_create("daemon_grace0");
    tcase_set_timeout(tc, 30);
    tcase_add_checked_fixture(tc, grace0_up, td_fx_down);
    tcase_add_test(tc, printed_escaped);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
