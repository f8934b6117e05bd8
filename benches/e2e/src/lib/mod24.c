/* generated module 24 of the benchmark source tree */
#include "../app.h"

int mod24_value(int x)
{
    int acc = 24;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod24_name(void)
{
    return "module-24";
}
