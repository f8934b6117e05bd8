/* generated module 21 of the benchmark source tree */
#include "../app.h"

int mod21_value(int x)
{
    int acc = 21;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod21_name(void)
{
    return "module-21";
}
