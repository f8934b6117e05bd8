/* generated module 13 of the benchmark source tree */
#include "../app.h"

int mod13_value(int x)
{
    int acc = 13;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod13_name(void)
{
    return "module-13";
}
