/* escape.c — printable forms of client-chosen bytes (see escape.h). */
#include "escape.h"

#include <string.h>

char *esc_bytes(char *out, size_t cap, const char *in, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    if (cap == 0)
        return out;
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)in[i];
        if (c >= 0x20 && c < 0x7f && c != '\\') {
            if (o + 1 >= cap)
                break;
            out[o++] = (char)c;
        } else {
            if (o + 4 >= cap)
                break;
            out[o++] = '\\';
            out[o++] = 'x';
            out[o++] = hex[c >> 4];
            out[o++] = hex[c & 15];
        }
    }
    out[o] = 0;
    return out;
}

char *esc_str(char *out, size_t cap, const char *in)
{
    return esc_bytes(out, cap, in ? in : "", in ? strlen(in) : 0);
}
