/* generated module 1 of the benchmark source tree */
#include "../app.h"

int mod1_value(int x)
{
    int acc = 1;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod1_name(void)
{
    return "module-1";
}
