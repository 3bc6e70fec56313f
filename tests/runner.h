/*
 * runner.h — private to tests/: how every Check program runs its suite, header-only so that
 * check_gpu_kernel (which links only the kernels, Check and cudart) uses it too.
 *
 * - GPU cases live in test cases tagged "gpu" (tu_gpu_tcase); on a machine without a GPU
 *   (no /dev/nvidiactl, or LA_TEST_NO_GPU=1) they are excluded by tag and counted as skipped.
 * - With $LA_TEST_RESULTS set (tests/run.sh sets it), the runner writes Check's own XML log to
 *   $LA_TEST_RESULTS/<program>.xml and the number of skipped cases to
 *   $LA_TEST_RESULTS/<program>.skipped: run.sh reads those files, never the printed text.
 * - CK_ENV: CK_VERBOSITY=verbose lists the cases, CK_RUN_CASE picks one.
 */
#ifndef LA_TESTS_RUNNER_H
#define LA_TESTS_RUNNER_H

#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Cases added to "gpu" test cases so far (tu_gpu_test, tu_gpu_loop_test). */
static int tu_gpu_cases;

/* 1 when this machine has an NVIDIA GPU and LA_TEST_NO_GPU is not 1. */
static inline int tu_has_gpu(void)
{
    const char *e = getenv("LA_TEST_NO_GPU");
    if (e != NULL && strcmp(e, "1") == 0)
        return 0;
    return access("/dev/nvidiactl", F_OK) == 0;
}

/* A test case of s whose cases need a GPU: tagged "gpu", with a timeout in seconds. */
static inline TCase *tu_gpu_tcase(Suite *s, const char *name, double timeout_s)
{
    TCase *tc = tcase_create(name);
    tcase_set_tags(tc, "gpu");
    tcase_set_timeout(tc, timeout_s);
    suite_add_tcase(s, tc);
    return tc;
}

/* Adds GPU cases and counts them (they are the skipped ones on a machine without a GPU). */
#define tu_gpu_test(tc, fn) (tcase_add_test(tc, fn), tu_gpu_cases++)
#define tu_gpu_loop_test(tc, fn, start, end) \
    (tcase_add_loop_test(tc, fn, start, end), tu_gpu_cases += (end) - (start))

/* Writes n into $LA_TEST_RESULTS/<program>.skipped. */
static inline void tu_write_skipped(const char *dir, int n)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s.skipped", dir, program_invocation_short_name);
    FILE *f = fopen(path, "w");
    if (!f)
        return;
    fprintf(f, "%d\n", n);
    fclose(f);
}

/* Runs s as described above; returns the program's exit status (0: every case passed). */
static inline int tu_run(Suite *s)
{
    SRunner *sr = srunner_create(s);
    const char *dir = getenv("LA_TEST_RESULTS");
    char xml[4096];
    if (dir && *dir) {
        snprintf(xml, sizeof(xml), "%s/%s.xml", dir, program_invocation_short_name);
        srunner_set_xml(sr, xml);
    }
    int gpu = tu_has_gpu();
    srunner_run_tagged(sr, NULL, NULL, NULL, gpu ? NULL : "gpu", CK_ENV);
    if (dir && *dir)
        tu_write_skipped(dir, gpu ? 0 : tu_gpu_cases);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}

#endif /* LA_TESTS_RUNNER_H */
