/* generated module 10 of the benchmark source tree */
#include "../app.h"

int mod10_value(int x)
{
    int acc = 10;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod10_name(void)
{
    return "module-10";
}
