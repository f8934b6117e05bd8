/* kiln e2e benchmark: a small fake application source tree. */
#include <stdio.h>
#include "app.h"

#define BUILD_TAG "original"

int main(int argc, char **argv)
{
    struct app_config cfg;
    config_defaults(&cfg);
    if (config_parse_args(&cfg, argc, argv) != 0)
        return 2;
    log_info("starting %s (%s)", APP_NAME, BUILD_TAG);
    return server_run(&cfg);
}
