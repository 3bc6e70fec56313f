/* codes.c — messages and names of the error codes (see codes.h). */
#include "codes.h"

const char *codes_strerror(int err)
{
    switch (err) {
    case 0:
        return "success";
#define X_(name, val, msg) \
    case val:              \
        return msg;
        LA_ERRNO_MAP(X_)
#undef X_
    default:
        return "unknown error";
    }
}

const char *codes_name(int err)
{
    switch (err) {
    case 0:
        return "LA_OK";
#define X_(name, val, msg) \
    case val:              \
        return "LA_" #name;
        LA_ERRNO_MAP(X_)
#undef X_
    default:
        return "LA_UNKNOWN";
    }
}
