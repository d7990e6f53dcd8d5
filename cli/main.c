#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "canopy.h"
#include "cli/cli.h"
#include "cli/cpu_tune.h"

static const char *usage =
    "usage: canopy <command> [options]\n"
    "\n"
    "Speculative-decoding inference for Hugging Face causal language models.\n"
    "\n"
    "commands:\n"
    "  generate     generate text from a prompt (streams tokens to stdout)\n"
    "  tokenize     print the token ids of a text\n"
    "  detokenize   print the text of token ids\n"
    "  bench acceptance  measure draft acceptance and speedup of tree shapes over prompts\n"
    "  bench costs  time the target's and the draft's forwards a speculative step is made of\n"
    "  tree-opt     the static draft tree with the best expected acceptance, or with --costs the\n"
    "               fastest on this machine (Sequoia)\n"
    "\n"
    "options:\n"
    "  -h, --help      show this help (or `canopy <command> --help`)\n"
    "  -V, --version   show the version\n"
    "\n"
    "The model folder defaults to $CANOPY_MODEL, else " CANOPY_DEFAULT_MODEL ".\n";

int cli_fail(const char *what) {
  fprintf(stderr, "canopy: %s: %s\n", what, canopy_last_error());
  return 1;
}

const char *cli_model_dir(const char *arg) {
  if (arg) return arg;
  const char *env = getenv("CANOPY_MODEL");
  return env && *env ? env : CANOPY_DEFAULT_MODEL;
}

int main(int argc, char **argv) {
  cli_tune_openblas(argv);
  if (argc < 2) {
    fputs(usage, stderr);
    return 2;
  }
  const char *cmd = argv[1];
  if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
    fputs(usage, stdout);
    return 0;
  }
  if (!strcmp(cmd, "-V") || !strcmp(cmd, "--version")) {
    printf("canopy %s\n", CANOPY_VERSION);
    return 0;
  }
  if (!strcmp(cmd, "generate")) return cli_generate(argc - 1, argv + 1);
  if (!strcmp(cmd, "tokenize")) return cli_tokenize(argc - 1, argv + 1);
  if (!strcmp(cmd, "detokenize")) return cli_detokenize(argc - 1, argv + 1);
  if (!strcmp(cmd, "bench")) return cli_bench(argc - 1, argv + 1);
  if (!strcmp(cmd, "tree-opt")) return cli_tree_opt(argc - 1, argv + 1);
  fprintf(stderr, "canopy: unknown command '%s'\n\n%s", cmd, usage);
  return 2;
}
