/* generated module 5 of the benchmark source tree */
#include "../app.h"

int mod5_value(int x)
{
    int acc = 5;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod5_name(void)
{
    return "module-5";
}
