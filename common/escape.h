/*
 * escape.h — private: bytes from clients made safe to print. Session keys (and other strings
 * a client chooses) reach the daemon's log and liteattnctl's tables; a newline there forges
 * log lines and an ESC drives the reader's terminal. esc_bytes writes them with every byte
 * outside printable ASCII (and the backslash) as \xNN, so what is printed is one line of
 * plain text that still tells different keys apart.
 */
#ifndef LA_COMMON_ESCAPE_H
#define LA_COMMON_ESCAPE_H

#include <stddef.h>

/* The most bytes esc_str writes for an input of n bytes, terminating NUL included. */
#define ESC_MAX(n) (4 * (n) + 1)

/* Writes the escaped form of in[0..len) into out (always NUL-terminated when cap > 0,
 * truncated at a whole escape). Returns out. */
char *esc_bytes(char *out, size_t cap, const char *in, size_t len);
/* The same for a NUL-terminated string (NULL prints as ""). */
char *esc_str(char *out, size_t cap, const char *in);

#endif /* LA_COMMON_ESCAPE_H */
