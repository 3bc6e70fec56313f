/*
 * codes.h — private: the names and messages of the error codes of liteattn_codes.h, for every
 * part of the project (the daemon, the engine, the client library). Generated from the one
 * table LA_ERRNO_MAP; the public la_strerror() and la_err_name() of libliteattn return these.
 */
#ifndef LA_COMMON_CODES_H
#define LA_COMMON_CODES_H

#include "liteattn_codes.h"

/* "invalid argument" for LA_EINVAL, "success" for 0, "unknown error" outside the table. */
const char *codes_strerror(int err);
/* "LA_EINVAL" for LA_EINVAL, "LA_OK" for 0, "LA_UNKNOWN" outside the table. */
const char *codes_name(int err);

#endif /* LA_COMMON_CODES_H */
