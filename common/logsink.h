/*
 * logsink.h — private: the one way a module below the daemon logs. Library code (the engine,
 * its backends) never prints: it formats a line and hands it to the sink its owner gave it;
 * the daemon's sink is its logger (daemon/log.c), a test's may collect the lines.
 */
#ifndef LA_COMMON_LOGSINK_H
#define LA_COMMON_LOGSINK_H

#include <stdarg.h>
#include <stddef.h>

/* Levels, most severe first. */
enum { LOG_ERROR = 0, LOG_WARN = 1, LOG_INFO = 2, LOG_DEBUG = 3 };

typedef void (*logsink_fn)(void *data, int level, const char *msg);

/* Formats one line and gives it to fn (nothing when fn is NULL). */
void logsink_printf(logsink_fn fn, void *data, int level, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void logsink_vprintf(logsink_fn fn, void *data, int level, const char *fmt, va_list ap)
    __attribute__((format(printf, 4, 0)));

/* Formats a message into buf (len bytes) and returns code: for "fail with this message". */
int errf(char *buf, size_t len, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif /* LA_COMMON_LOGSINK_H */
