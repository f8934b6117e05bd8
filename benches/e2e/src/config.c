#include <stdlib.h>
#include <string.h>
#include "app.h"

void config_defaults(struct app_config *cfg)
{
    cfg->port = 8080;
    cfg->workers = 4;
    cfg->verbose = 0;
    cfg->root = "/srv/www";
}

int config_parse_args(struct app_config *cfg, int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-p") == 0 && i + 1 < argc)
            cfg->port = atoi(argv[++i]);
        else if (strcmp(argv[i], "-w") == 0 && i + 1 < argc)
            cfg->workers = atoi(argv[++i]);
        else if (strcmp(argv[i], "-v") == 0)
            cfg->verbose = 1;
        else if (strcmp(argv[i], "-r") == 0 && i + 1 < argc)
            cfg->root = argv[++i];
        else {
            log_error("unknown argument %s", argv[i]);
            return -1;
        }
    }
    return 0;
}
