/* generated module 9 of the benchmark source tree */
#include "../app.h"

int mod9_value(int x)
{
    int acc = 9;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod9_name(void)
{
    return "module-9";
}
