/* logsink.c — formatting for log sinks and error messages (see logsink.h). */
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

#include "logsink.h"

void logsink_vprintf(logsink_fn fn, void *data, int level, const char *fmt, va_list ap)
{
    if (!fn)
        return;
    char msg[512];
    vsnprintf(msg, sizeof(msg), fmt, ap);
    fn(data, level, msg);
}

void logsink_printf(logsink_fn fn, void *data, int level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    logsink_vprintf(fn, data, level, fmt, ap);
    va_end(ap);
}

int errf(char *buf, size_t len, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, len, fmt, ap);
    va_end(ap);
    return code;
}
