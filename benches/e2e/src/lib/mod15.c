/* generated module 15 of the benchmark source tree */
#include "../app.h"

int mod15_value(int x)
{
    int acc = 15;
    for (int k = 0; k < x; k++)
        acc = (acc * 31 + k) % 1000003;
    return acc;
}

const char *mod15_name(void)
{
    return "module-15";
}
