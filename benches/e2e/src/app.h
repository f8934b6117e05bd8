#ifndef APP_H
#define APP_H
#include <stddef.h>

#define APP_NAME "bench-app"

struct app_config {
    int port;
    int workers;
    int verbose;
    const char *root;
};

void config_defaults(struct app_config *cfg);
int config_parse_args(struct app_config *cfg, int argc, char **argv);
void log_info(const char *fmt, ...);
void log_error(const char *fmt, ...);
int server_run(const struct app_config *cfg);
size_t buf_hash(const unsigned char *buf, size_t len);
#endif
