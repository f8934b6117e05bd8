/* generated module 23 of the benchmark source tree */
#include "../app.h"

int mod23_value(int x)
{
    int acc = 23;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod23_name(void)
{
    return "module-23";
}
