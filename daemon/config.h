/*
 * config.h — private: liteattnd's settings, from the command line and the config file.
 *
 * Every long option has a config-file key of the same name with '-' turned into '_'
 * (--max-inflight 8 on the command line, "max_inflight = 8" in the file). The file is
 * --config FILE, else /etc/liteattn/liteattnd.conf when it exists; command-line flags
 * override it. Sizes accept K, M, G (and T) suffixes (powers of 1024).
 */
#ifndef LA_DAEMON_CONFIG_H
#define LA_DAEMON_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <sys/un.h>

#include "engine.h"

#define CFG_DEFAULT_FILE "/etc/liteattn/liteattnd.conf"
#define CFG_SOCKET_MAX sizeof(((struct sockaddr_un *)0)->sun_path)

typedef struct cfg {
    char socket_path[CFG_SOCKET_MAX];
    char backend[8];    /* auto, cpu, cuda */
    int threads;        /* CPU backend, 0: number of cores */
    int log_level;      /* LOG_ERROR..LOG_DEBUG */
    uint32_t max_frame; /* bytes of one request */
    uint32_t max_conns_per_user;
    /* The engine's limits (engine.h: their meaning and defaults, eng_config_default), handed
     * to eng_new as they are; max_inflight_per_conn is also the connection's flow control. */
    eng_limits limits;
    uint64_t cpu_slice; /* multiply-adds per CPU slice, 0 = the backend's default */
    uint32_t hello_timeout_s;
    uint64_t max_outbound_bytes;          /* queued replies per connection before it is dropped */
    uint64_t max_outbound_bytes_per_user; /* the same over a user's connections, 0 = none */
    uint32_t max_fds_per_user;            /* received fds not yet claimed, per user, 0 = none */
    unsigned socket_mode;
} cfg;

/* What cfg_parse asks of the caller. */
enum { CFG_RUN = 0, CFG_EXIT_OK = 1 };

/* Parses argv (and the config file) into c. Returns CFG_RUN, CFG_EXIT_OK after --help or
 * --version were printed to stdout, or LA_EINVAL with a message in err (exit status 2). */
int cfg_parse(cfg *c, int argc, char **argv, char *err, size_t errlen);

/* The socket a daemon listens on when given none: $LITEATTN_SOCKET, else
 * $RUNTIME_DIRECTORY/liteattn.sock (systemd's RuntimeDirectory=), else
 * $XDG_RUNTIME_DIR/liteattn.sock, else /run/liteattn/liteattn.sock — the same order as the
 * client's la_default_socket_path() (which has no RuntimeDirectory; under systemd both are
 * /run/liteattn). Returns 0 or LA_EINVAL when the path does not fit. */
int cfg_default_socket(char *buf, size_t len);

/* "12M" → 12582912. Returns 0 or LA_EINVAL. */
int cfg_parse_size(const char *s, uint64_t *ret);

#endif /* LA_DAEMON_CONFIG_H */
