/* generated module 17 of the benchmark source tree */
#include "../app.h"

int mod17_value(int x)
{
    int acc = 17;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod17_name(void)
{
    return "module-17";
}
