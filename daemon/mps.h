/*
 * mps.h — private: what the daemon can see of NVIDIA MPS on its host, for the Hello reply and
 * `liteattnctl status`. Whether the daemon's own CUDA context is an MPS client is CUDA's answer
 * (eng_device_info.mps, from CU_DEVICE_ATTRIBUTE_MPS_ENABLED); this module adds where the driver
 * looks for the control daemon and whether one listens there, so that "off" can say why.
 */
#ifndef LA_DAEMON_MPS_H
#define LA_DAEMON_MPS_H

#include <stddef.h>

typedef struct mps_view {
    char pipe_dir[256]; /* $CUDA_MPS_PIPE_DIRECTORY, or the driver's default /tmp/nvidia-mps */
    int control;        /* 1: <pipe_dir>/control is a socket (a control daemon listens), else 0 */
} mps_view;

/* Looks at the file system now (a stat of one path; cheap enough for every Hello). */
void mps_look(mps_view *ret_view);

#endif /* LA_DAEMON_MPS_H */
