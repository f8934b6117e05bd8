/* generated module 11 of the benchmark source tree */
#include "../app.h"

int mod11_value(int x)
{
    int acc = 11;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod11_name(void)
{
    return "module-11";
}
