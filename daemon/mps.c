/* mps.c — where CUDA looks for the MPS control daemon and whether one is there (see mps.h).
 *
 * The CUDA driver connects, when it creates a context, to the Unix socket "control" that
 * nvidia-cuda-mps-control -d creates in its pipe directory ($CUDA_MPS_PIPE_DIRECTORY, default
 * /tmp/nvidia-mps), both as seen by the process: a client and the control daemon must agree on
 * the directory, and a private /tmp (systemd's PrivateTmp=, which liteattnd.service sets) hides
 * the default one. So the daemon reports the directory its own driver uses and whether that
 * socket exists in its own mount namespace: with the context attribute (CUDA's answer), that
 * tells "on", "off: no control daemon where the driver looks", and "off: a control daemon is
 * there but this context is not its client" (started before the control daemon, or another
 * user's MPS server held the GPU) apart. */
#include "mps.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

void mps_look(mps_view *v)
{
    memset(v, 0, sizeof *v);
    const char *dir = getenv("CUDA_MPS_PIPE_DIRECTORY");
    snprintf(v->pipe_dir, sizeof v->pipe_dir, "%s", dir && *dir ? dir : "/tmp/nvidia-mps");
    char path[sizeof v->pipe_dir + 16];
    snprintf(path, sizeof path, "%s/control", v->pipe_dir);
    struct stat st;
    v->control = stat(path, &st) == 0 && S_ISSOCK(st.st_mode);
}
