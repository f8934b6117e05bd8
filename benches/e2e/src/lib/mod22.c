/* generated module 22 of the benchmark source tree */
#include "../app.h"

int mod22_value(int x)
{
    int acc = 22;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod22_name(void)
{
    return "module-22";
}
