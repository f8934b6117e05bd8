/* generated module 8 of the benchmark source tree */
#include "../app.h"

int mod8_value(int x)
{
    int acc = 8;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod8_name(void)
{
    return "module-8";
}
