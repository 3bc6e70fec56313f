/*
 * server.h — private: liteattnd's event loop and listener.
 *
 * The server owns the libuv loop, the listening socket (created, or adopted from systemd's
 * socket activation), the engine, the connections, the completion wake-up (one uv_async_t
 * that the engine's workers signal), the 1-second tick (eng_tick, systemd watchdog and
 * STATUS=), and the signals. Everything runs on the loop thread.
 *
 * Shutdown (SIGTERM/SIGINT): stop accepting, stop reading requests, cancel the queued jobs at
 * once and let the running ones finish (GPU) or stop before their next k-tile (CPU)
 * (eng_shutdown, then eng_idle), flush the replies (at most
 * SRV_FLUSH_GRACE_S seconds more for clients that do not read), close every handle and leave
 * the loop; exit status 0. A second signal exits at once with status 1. A sticky GPU error
 * (eng_fatal) fails every request in flight with LA_EDEVICE and exits with status 3.
 */
#ifndef LA_DAEMON_SERVER_H
#define LA_DAEMON_SERVER_H

#include <stdint.h>
#include <uv.h>

#include "config.h"
#include "conn.h"
#include "dispatch.h"
#include "engine.h"
#include "list.h"
#include "users.h"

#define SRV_FLUSH_GRACE_S 5
#define SRV_TRIM_BYTES (4u << 20) /* freed buffers after which the heap is trimmed */

/* Exit statuses of liteattnd. */
enum { SRV_EXIT_OK = 0, SRV_EXIT_FAIL = 1, SRV_EXIT_USAGE = 2, SRV_EXIT_FATAL = 3 };

typedef struct srv_counters {
    conn_counters io; /* every connection's frames and bytes */
    uint64_t connections_total, rejected_connections;
    uint64_t trims; /* malloc_trim calls (trim_memory) */
} srv_counters;

/* One Unix user with connections: what they hold, summed (conn_user). */
typedef struct srv_user {
    uid_node node; /* in srv.users */
    uint32_t conns;
    conn_user acct;
} srv_user;

typedef struct srv {
    uv_loop_t loop;
    cfg cfg;
    eng *eng;
    disp disp; /* the request hook's context: eng, cfg, the server's counters */

    int listen_fd;  /* -1 when closed */
    int lock_fd;    /* flock on "<socket>.lock", -1 under socket activation */
    int reserve_fd; /* spare fd, released to shed a connection when fds run out */
    int own_socket; /* we created the socket file: unlink it at exit */
    int activated;  /* the socket came from systemd */
    uv_poll_t listen_poll;
    int listen_active;

    uv_async_t async; /* engine completions */
    uv_timer_t tick;
    uv_signal_t sig_int, sig_term;

    list_node conns; /* open connections (conn.link) */
    list_node users; /* srv_user of every uid with an open connection */
    uint32_t n_conns;
    uint64_t next_conn_id;
    srv_counters ctr;
    uint64_t start_ms;
    uint64_t refused_log_ms;   /* last "refused a connection" line (log_refused) */
    unsigned refused_unlogged; /* refusals since, not logged */
    uint64_t trim_ms;          /* last malloc_trim (trim_memory) */
    uint64_t trimmed_bytes;    /* ctr.io.bytes_released at that trim */

    int stopping;       /* shutdown begun */
    int handles_closed; /* final uv_close of the server handles done */
    int fatal;
    int signals;
    unsigned drain_ticks; /* ticks since the engine became idle during shutdown */
    uint64_t watchdog_usec;
    char status[128]; /* last STATUS= sent */
} srv;

/* Sets up the loop, the listening socket and the engine, and starts accepting; READY=1 is sent
 * to systemd here. On error writes a message into err and returns LA_E*. */
int srv_new(const cfg *c, srv **ret_srv, char *err, size_t errlen);
/* Runs until shutdown; returns the exit status (SRV_EXIT_*). */
int srv_run(srv *s);
/* Frees what srv_run left (after SRV_EXIT_FATAL the engine is not freed: its GPU context is
 * poisoned and the process is about to exit). NULL is allowed. */
void srv_free(srv *s);

/* Serves fd (a connected socket of peer uid/gid/pid) as one of s's connections, with the
 * server's hooks. Takes ownership of fd. Used by the listener and by in-process drivers (the
 * fuzzers) that set up a srv by hand (cfg, loop and srv_set_engine). */
int srv_attach(srv *s, int fd, uint32_t uid, uint32_t gid, int32_t pid, conn **ret_conn);
/* Gives s its engine (and dispatch its context). */
void srv_set_engine(srv *s, eng *e);
/* Shutdown progress check: call whenever a job finished or an outbound queue drained. */
void srv_maybe_finish(srv *s);
uint64_t srv_now_ms(void);

#endif /* LA_DAEMON_SERVER_H */
