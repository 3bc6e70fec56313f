/* codes.c — messages and names of the error codes (see codes.h). */
#include "codes.h"

#include <stddef.h>

typedef struct code_info {
    int code;
    const char *name, *msg;
} code_info;

static const code_info codes[] = {{0, "LA_OK", "success"},
#define X_(name, val, msg) {val, "LA_" #name, msg},
                                  LA_ERRNO_MAP(X_)
#undef X_
};

static const code_info *find(int err)
{
    for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++)
        if (codes[i].code == err)
            return &codes[i];
    return NULL;
}

const char *codes_strerror(int err)
{
    const code_info *c = find(err);
    return c ? c->msg : "unknown error";
}

const char *codes_name(int err)
{
    const code_info *c = find(err);
    return c ? c->name : "LA_UNKNOWN";
}
