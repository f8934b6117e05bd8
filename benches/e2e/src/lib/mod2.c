/* generated module 2 of the benchmark source tree */
#include "../app.h"

int mod2_value(int x)
{
    int acc = 2;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod2_name(void)
{
    return "module-2";
}
