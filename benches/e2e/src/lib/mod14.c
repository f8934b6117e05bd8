/* generated module 14 of the benchmark source tree */
#include "../app.h"

int mod14_value(int x)
{
    int acc = 14;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod14_name(void)
{
    return "module-14";
}
