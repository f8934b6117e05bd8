/* generated module 19 of the benchmark source tree */
#include "../app.h"

int mod19_value(int x)
{
    int acc = 19;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod19_name(void)
{
    return "module-19";
}
