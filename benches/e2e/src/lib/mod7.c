/* generated module 7 of the benchmark source tree */
#include "../app.h"

int mod7_value(int x)
{
    int acc = 7;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod7_name(void)
{
    return "module-7";
}
