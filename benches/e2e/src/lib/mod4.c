/* generated module 4 of the benchmark source tree */
#include "../app.h"

int mod4_value(int x)
{
    int acc = 4;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod4_name(void)
{
    return "module-4";
}
