/* generated module 20 of the benchmark source tree */
#include "../app.h"

int mod20_value(int x)
{
    int acc = 20;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod20_name(void)
{
    return "module-20";
}
