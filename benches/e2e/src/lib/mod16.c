/* generated module 16 of the benchmark source tree */
#include "../app.h"

int mod16_value(int x)
{
    int acc = 16;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod16_name(void)
{
    return "module-16";
}
