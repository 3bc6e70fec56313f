/*
 * main.c — liteattnd: parse the options, set up logging, run the server.
 *
 * liteattnd always runs in the foreground and never forks (CUDA cannot be used in a child
 * forked after its initialisation, and systemd supervises the process: Type=notify,
 * Restart=on-failure). Exit status: 0 after a clean shutdown on SIGTERM/SIGINT, 1 when it
 * cannot start or on a second signal, 2 for bad options, 3 after a fatal GPU error.
 */
#include <signal.h>
#include <stdlib.h>
#include <stdio.h>
#include <unistd.h>

#include "config.h"
#include "log.h"
#include "server.h"

int main(int argc, char **argv)
{
    /* Replies are sent with MSG_NOSIGNAL; this covers any other write to a closed peer. */
    signal(SIGPIPE, SIG_IGN);
    /* Every kernel is loaded when the CUDA context is made, never at its first launch: a lazy
     * load waits for the device, and the device may be waiting on a fast-path doorbell that
     * only a client's stream rings (the GPU launcher would then stall every client until that
     * doorbell's timeout). Set before any thread starts and before CUDA is initialised. */
    setenv("CUDA_MODULE_LOADING", "EAGER", 1);

    cfg c;
    char err[512] = "";
    int rc = cfg_parse(&c, argc, argv, err, sizeof(err));
    if (rc == CFG_EXIT_OK)
        return 0;
    if (rc < 0) {
        fprintf(stderr, "liteattnd: %s\n", err);
        return SRV_EXIT_USAGE;
    }
    log_init(c.log_level);

    srv *s = NULL;
    if (srv_new(&c, &s, err, sizeof(err)) < 0) {
        log_error("%s", err);
        return SRV_EXIT_FAIL;
    }
    int status = srv_run(s);
    if (status == SRV_EXIT_FATAL) {
        /* The GPU context is poisoned: leave without tearing anything down. */
        fflush(stderr);
        _exit(status);
    }
    srv_free(s);
    log_info("stopped");
    return status;
}
