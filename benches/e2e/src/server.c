#include <stdio.h>
#include "app.h"

int server_run(const struct app_config *cfg)
{
    log_info("serving %s on port %d with %d workers", cfg->root, cfg->port, cfg->workers);
    for (int w = 0; w < cfg->workers; w++)
        log_info("worker %d ready", w);
    return 0;
}
