/* Many sessions served together against the same sessions one at a time, in one run: what
 * canopy_sessions_step buys a server. Batched, each round of drafting is one draft forward for
 * every session's tree level and one target forward verifies every tree; one at a time, each
 * session runs its own forwards. Same prompts (the first S dev prompts with the chat template),
 * same trees, greedy, so both modes produce the same tokens (checked).
 * usage: bench_batch [-m DIR] [-d DIR] [--draft-layers N] [--tree SPEC] [--sessions S] [-n N]
 *                    [--prompts FILE.jsonl] [--threads N] */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_util.h"
#include "canopy.h"
#include "cli/cpu_tune.h"

#define MAX_SESSIONS 64
#define MAX_PROMPT 1024

typedef struct run_result {
  double seconds;
  long tokens, target_forwards, draft_forwards;
  int32_t *out[MAX_SESSIONS];
  int n_out[MAX_SESSIONS];
} run_result;

static void die(const char *what) {
  fprintf(stderr, "bench_batch: %s: %s\n", what, canopy_last_error());
  exit(1);
}

static int load_prompts(const char *path, const canopy_tokenizer *tok, int want, int32_t ids[][MAX_PROMPT],
                        int *n_ids) {
  FILE *f = fopen(path, "r");
  if (!f) {
    fprintf(stderr, "bench_batch: cannot open %s\n", path);
    exit(1);
  }
  char line[8192];
  int n = 0;
  while (n < want && fgets(line, sizeof line, f)) {
    cJSON *j = cJSON_Parse(line);
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(j, "prompt");
    if (cJSON_IsString(p)) {
      canopy_chat_message msg = {"user", p->valuestring};
      char *text;
      if (canopy_chat_apply(tok, &msg, 1, 1, &text)) die("chat template");
      if (canopy_tokenize(tok, text, strlen(text), 0, ids[n], MAX_PROMPT, &n_ids[n])) die(path);
      free(text);
      n++;
    }
    cJSON_Delete(j);
  }
  fclose(f);
  return n;
}

static void run(canopy_model *target, canopy_model *draft, const char *tree, int S, int32_t prompts[][MAX_PROMPT],
                const int *n_prompt, int n_new, int batched, run_result *r) {
  canopy_session *ss[MAX_SESSIONS];
  canopy_model_info ti, di, ti2, di2;
  canopy_model_get_info(target, &ti);
  if (draft) canopy_model_get_info(draft, &di);
  canopy_session_params sp = canopy_session_default_params();
  sp.max_tokens = n_new;
  sp.stop_at_eos = 0;
  sp.draft = draft;
  sp.tree = tree;
  double t0 = bench_now_s();
  for (int i = 0; i < S; i++) {
    if (canopy_session_create(target, &sp, &ss[i]) || canopy_session_append(ss[i], prompts[i], n_prompt[i]))
      die("session");
    r->n_out[i] = 0;
  }
  int32_t t;
  if (batched) {
    for (int stepped = 1; stepped > 0;) {
      if (canopy_sessions_step(ss, S, &stepped)) die("step");
      for (int i = 0; i < S; i++)
        while (canopy_session_ready(ss[i]) > 0 && canopy_session_next(ss[i], &t) == CANOPY_OK)
          r->out[i][r->n_out[i]++] = t;
    }
  } else {
    for (int i = 0; i < S; i++)
      while (canopy_session_next(ss[i], &t) == CANOPY_OK) r->out[i][r->n_out[i]++] = t;
  }
  r->seconds = bench_now_s() - t0;
  r->tokens = 0;
  for (int i = 0; i < S; i++) {
    r->tokens += r->n_out[i];
    canopy_session_free(ss[i]);
  }
  canopy_model_get_info(target, &ti2);
  r->target_forwards = (long)(ti2.n_forwards - ti.n_forwards);
  r->draft_forwards = 0;
  if (draft) {
    canopy_model_get_info(draft, &di2);
    r->draft_forwards = (long)(di2.n_forwards - di.n_forwards);
  }
}

int main(int argc, char **argv) {
  cli_tune_openblas(argv);
  const char *dir = "models/SmolLM2-135M-Instruct", *ddir = NULL, *tree = "chain:4";
  const char *prompts_path = "../shared/data/dev_prompts.jsonl";
  int threads = 0, S = 8, n_new = 32, layers = 4;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "-m") && i + 1 < argc) dir = argv[++i];
    else if (!strcmp(argv[i], "-d") && i + 1 < argc) ddir = argv[++i];
    else if (!strcmp(argv[i], "--draft-layers") && i + 1 < argc) layers = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--tree") && i + 1 < argc) tree = argv[++i];
    else if (!strcmp(argv[i], "--sessions") && i + 1 < argc) S = atoi(argv[++i]);
    else if (!strcmp(argv[i], "-n") && i + 1 < argc) n_new = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--prompts") && i + 1 < argc) prompts_path = argv[++i];
    else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
    else {
      fprintf(stderr, "usage: bench_batch [-m DIR] [-d DIR] [--draft-layers N] [--tree SPEC] [--sessions S] [-n N] "
                      "[--prompts FILE.jsonl] [--threads N]\n");
      return 2;
    }
  }
  if (S < 1 || S > MAX_SESSIONS || n_new < 1) {
    fprintf(stderr, "bench_batch: --sessions must be 1..%d and -n >= 1\n", MAX_SESSIONS);
    return 2;
  }
  canopy_model_params mp = canopy_model_default_params();
  mp.n_threads = threads;
  mp.prefix_cache = 0; /* both modes start from cold caches */
  canopy_model *target, *draft;
  if (canopy_model_load(dir, &mp, &target)) die(dir);
  if (!ddir) mp.n_layers = layers; /* no draft folder: the target's first layers as a stand-in */
  if (canopy_model_load(ddir ? ddir : dir, &mp, &draft)) die(ddir ? ddir : dir);
  canopy_tokenizer *tok;
  if (canopy_tokenizer_load(dir, &tok)) die(dir);
  static int32_t prompts[MAX_SESSIONS][MAX_PROMPT];
  int n_prompt[MAX_SESSIONS];
  S = load_prompts(prompts_path, tok, S, prompts, n_prompt);

  printf("bench_batch: %d sessions x %d new tokens, tree %s, draft ", S, n_new, tree);
  if (ddir) printf("%s\n", ddir);
  else printf("stand-in: the target's first %d layers and its head\n", layers);
  printf("%-28s %8s %9s %9s %9s %8s\n", "mode", "tokens", "seconds", "tok/s", "target_fw", "draft_fw");
  static run_result res[4];
  const char *names[4] = {"target only, one at a time", "target only, batched", "speculative, one at a time",
                          "speculative, batched"};
  for (int k = 0; k < 4; k++) {
    for (int i = 0; i < S; i++) res[k].out[i] = malloc(sizeof(int32_t) * (size_t)n_new);
    run(target, k >= 2 ? draft : NULL, k >= 2 ? tree : NULL, S, prompts, n_prompt, n_new, k % 2, &res[k]);
    printf("%-28s %8ld %9.2f %9.1f %9ld %8ld\n", names[k], res[k].tokens, res[k].seconds,
           res[k].tokens / res[k].seconds, res[k].target_forwards, res[k].draft_forwards);
  }
  int same = 1;
  for (int k = 1; k < 4; k++)
    for (int i = 0; i < S; i++)
      same &= res[k].n_out[i] == res[0].n_out[i] &&
              !memcmp(res[k].out[i], res[0].out[i], sizeof(int32_t) * (size_t)res[0].n_out[i]);
  printf("batched / one at a time: target only %.2fx, speculative %.2fx; speculative batched / target only batched "
         "%.2fx; all four modes %s\n",
         res[0].seconds / res[1].seconds, res[2].seconds / res[3].seconds, res[1].seconds / res[3].seconds,
         same ? "gave the same tokens" : "DIFFER (near-ties of the target's top two logits?)");
  for (int k = 0; k < 4; k++)
    for (int i = 0; i < S; i++) free(res[k].out[i]);
  canopy_tokenizer_free(tok);
  canopy_model_free(draft);
  canopy_model_free(target);
  return 0;
}
