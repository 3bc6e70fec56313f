/* errors.c — la_strerror and la_err_name (the table is in common/codes.c), the thread-local
 * error detail and the log callback. */
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "codes.h"
#include "internal.h"

static _Thread_local char errbuf[CL_ERRMSG_MAX];

static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static la_log_fn log_fn;
static void *log_user;

LA_API const char *la_strerror(int err) { return codes_strerror(err); }

LA_API const char *la_err_name(int err) { return codes_name(err); }

LA_API const char *la_last_error_message(void) { return errbuf; }

int cl_fail(int code, const char *fmt, ...)
{
    if (!fmt) {
        snprintf(errbuf, sizeof(errbuf), "%s", la_strerror(code));
        return code;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, sizeof(errbuf), fmt, ap);
    va_end(ap);
    return code;
}

LA_API void la_set_log(la_log_fn fn, void *user)
{
    pthread_mutex_lock(&log_lock);
    log_fn = fn;
    log_user = user;
    pthread_mutex_unlock(&log_lock);
}

void cl_log(int level, const char *fmt, ...)
{
    pthread_mutex_lock(&log_lock);
    la_log_fn fn = log_fn;
    void *user = log_user;
    pthread_mutex_unlock(&log_lock);
    if (!fn)
        return;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    fn(user, level, msg);
}

LA_API const char *la_version(void) { return LA_VERSION_STRING; }
