/* generated module 12 of the benchmark source tree */
#include "../app.h"

int mod12_value(int x)
{
    int acc = 12;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod12_name(void)
{
    return "module-12";
}
