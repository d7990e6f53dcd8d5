/* The canopy program's commands. Each returns the process exit status. */
#ifndef CANOPY_CLI_CLI_H
#define CANOPY_CLI_CLI_H

#include <stdint.h>

#define CANOPY_DEFAULT_MODEL "models/SmolLM2-135M-Instruct"

int cli_generate(int argc, char **argv);
int cli_tokenize(int argc, char **argv);
int cli_detokenize(int argc, char **argv);
int cli_bench(int argc, char **argv);
int cli_bench_costs(int argc, char **argv); /* canopy bench costs (cli/bench_costs.c) */
int cli_tree_opt(int argc, char **argv);

/* Option values: 0, or a message "canopy: CMD: NAME 'S' must be ..." on stderr and 2 (usage). */
int cli_parse_int(const char *cmd, const char *name, const char *s, int lo, int *out);
int cli_parse_double(const char *cmd, const char *name, const char *s, double lo, double hi, double *out);
int cli_parse_u64(const char *cmd, const char *name, const char *s, uint64_t *out);
/* --device cpu|cuda into a canopy_device. */
int cli_parse_device(const char *cmd, const char *s, int *out);

/* A whole file ('-': standard input), NUL-terminated; NULL with errno set if it cannot be read.
 * Caller frees. */
char *cli_read_file(const char *path);

/* Writes text to path: 0, or "canopy: CMD: cannot write 'PATH': <reason>" on stderr and 1. */
int cli_write_file(const char *cmd, const char *path, const char *text);

/* Adds "command" (`canopy bench` and argv, the bench's own arguments) and "date" (UTC, ISO 8601)
 * to a bench's JSON object o (a cJSON *); 0, or -1 without memory. */
int cli_add_run_info(void *o, int argc, char **argv);

/* Prints "canopy: <what>: <canopy_last_error()>" to stderr and returns 1. */
int cli_fail(const char *what);

/* The model folder: the -m argument, else $CANOPY_MODEL, else the default. */
const char *cli_model_dir(const char *arg);

#endif
