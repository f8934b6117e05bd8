/* generated module 18 of the benchmark source tree */
#include "../app.h"

int mod18_value(int x)
{
    int acc = 18;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod18_name(void)
{
    return "module-18";
}
