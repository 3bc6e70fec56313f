/* log.c — stderr logger with sd-daemon priority prefixes under journald (see log.h). */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

static int g_level = LOG_INFO;
static int g_journal;

static const char *const names[] = {"error", "warn", "info", "debug"};
/* syslog priorities: LOG_ERR 3, LOG_WARNING 4, LOG_INFO 6, LOG_DEBUG 7 */
static const int prio[] = {3, 4, 6, 7};

/* $JOURNAL_STREAM is "dev:inode" of the stream systemd connected stderr to; if stderr is still
 * that stream, journald reads our lines and understands the "<N>" prefix. */
static int stderr_is_journal(void)
{
    const char *js = getenv("JOURNAL_STREAM");
    if (!js)
        return 0;
    unsigned long long dev, ino;
    if (sscanf(js, "%llu:%llu", &dev, &ino) != 2)
        return 0;
    struct stat st;
    if (fstat(STDERR_FILENO, &st) < 0)
        return 0;
    return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

void log_init(int level)
{
    g_level = level < LOG_ERROR ? LOG_ERROR : level > LOG_DEBUG ? LOG_DEBUG : level;
    g_journal = stderr_is_journal();
}

int log_level(void) { return g_level; }

int log_level_parse(const char *name)
{
    for (int i = 0; i < 4; i++)
        if (strcasecmp(name, names[i]) == 0)
            return i;
    if (strcasecmp(name, "warning") == 0)
        return LOG_WARN;
    return -1;
}

const char *log_level_name(int level)
{
    return level >= 0 && level <= LOG_DEBUG ? names[level] : "?";
}

void log_msg(int level, const char *fmt, ...)
{
    if (level > g_level)
        return;
    if (level < LOG_ERROR)
        level = LOG_ERROR;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    /* One fprintf per line so that lines of concurrent writers never interleave. */
    if (g_journal)
        fprintf(stderr, "<%d>liteattnd: %s\n", prio[level], line);
    else
        fprintf(stderr, "liteattnd: %s: %s\n", names[level], line);
}

void log_engine_sink(void *data, int level, const char *msg)
{
    (void)data;
    log_msg(level, "engine: %s", msg);
}
