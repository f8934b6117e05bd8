#include "app.h"

/* FNV-1a, enough for a benchmark fixture. */
size_t buf_hash(const unsigned char *buf, size_t len)
{
    size_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < len; i++) {
        h ^= buf[i];
        h *= 1099511628211ULL;
    }
    return h;
}
