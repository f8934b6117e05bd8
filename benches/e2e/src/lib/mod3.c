/* generated module 3 of the benchmark source tree */
#include "../app.h"

int mod3_value(int x)
{
    int acc = 3;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod3_name(void)
{
    return "module-3";
}
