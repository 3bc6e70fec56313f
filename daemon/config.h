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

#define CFG_DEFAULT_FILE "/etc/liteattn/liteattnd.conf"
#define CFG_SOCKET_MAX sizeof(((struct sockaddr_un *)0)->sun_path)

typedef struct cfg {
    char socket_path[CFG_SOCKET_MAX];
    char backend[8];       /* auto, cpu, cuda */
    int threads;           /* CPU backend, 0: number of cores */
    int log_level;         /* LOG_ERROR..LOG_DEBUG */
    uint32_t max_frame;    /* bytes of one request */
    uint32_t max_inflight; /* attention requests in flight per connection */
    uint32_t max_conns_per_user;
    uint32_t max_buffers;      /* per connection */
    uint64_t max_buffer_bytes; /* per connection */
    uint32_t max_buffers_per_user;
    uint64_t max_buffers_total; /* 0: half of vm.max_map_count */
    uint32_t max_sessions;      /* per user */
    uint64_t max_mask_bytes;    /* per user */
    uint64_t mask_memory_cap;   /* all users, 0 = none */
    uint64_t max_call_cost;     /* multiply-adds of one attention call, 0 = none */
    uint64_t max_queued_cost;   /* multiply-adds queued or running per user, 0 = none */
    uint64_t cpu_slice;         /* multiply-adds per CPU slice, 0 = the backend's default */
    uint32_t session_grace_s, session_ttl_s, hello_timeout_s;
    uint32_t doorbell_timeout_s; /* fast path: a launched call waits this long for its doorbell */
    uint32_t max_doorbell_slots; /* slots of one connection's doorbell */
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
