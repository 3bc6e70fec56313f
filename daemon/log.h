/*
 * log.h — private: the daemon's logger. Messages go to stderr, one line each, without
 * timestamps (journald adds its own). Under systemd (stderr is the journal stream named by
 * $JOURNAL_STREAM) every line carries an sd-daemon priority prefix ("<3>") so that journald
 * records the level; otherwise lines read "liteattnd: error: ...".
 *
 * Only the daemon program logs (the engine hands its messages to log_engine_sink); each event
 * is logged once, by the code that decides what happens next, naming the object.
 */
#ifndef LA_DAEMON_LOG_H
#define LA_DAEMON_LOG_H

#include "logsink.h" /* the levels */

/* Sets the most verbose level printed (clamped to LOG_ERROR..LOG_DEBUG) and detects journald. */
void log_init(int level);
int log_level(void);
/* "error", "warn", "info", "debug" → level; -1 for anything else. */
int log_level_parse(const char *name);
const char *log_level_name(int level);

void log_msg(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)

/* For eng_config.log: the engine's messages at its level (0 error .. 3 debug). */
void log_engine_sink(void *data, int level, const char *msg);

#endif /* LA_DAEMON_LOG_H */
