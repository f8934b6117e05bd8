/* generated module 6 of the benchmark source tree */
#include "../app.h"

int mod6_value(int x)
{
    int acc = 6;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod6_name(void)
{
    return "module-6";
}
