/* canopy generate: load, (optionally) apply the chat template, prefill, stream tokens. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "canopy.h"
#include "cli/cli.h"

static const char *usage =
    "usage: canopy generate [options] (-p TEXT | -f FILE)\n"
    "\n"
    "Generates a continuation of the prompt and streams it to stdout; statistics go to stderr.\n"
    "\n"
    "  -m, --model DIR       model folder (config.json, *.safetensors, tokenizer.json)\n"
    "  -p, --prompt TEXT     the prompt\n"
    "  -f, --file FILE       read the prompt from FILE ('-' for standard input)\n"
    "  -n, --max-tokens N    new tokens at most (default 256)\n"
    "      --chat            wrap the prompt as a user turn with the model's chat template\n"
    "      --system TEXT     system message for --chat\n"
    "      --temp T          sampling temperature; 0 is greedy (default 0)\n"
    "      --top-k K         keep the K most likely tokens (default 0: off)\n"
    "      --top-p P         keep the smallest set of tokens with mass P (default 1: off)\n"
    "      --seed S          random seed (default 42)\n"
    "      --threads N       CPU threads (default: all cores)\n"
    "      --device D        cpu (fp32, default) or cuda (bf16 on GPU 0), for target and draft\n"
    "      --no-graphs       cuda: launch every op of every forward (no CUDA graphs)\n"
    "      --ctx N           context length (default: the model's)\n"
    "      --kv-blocks N     KV cache blocks of 16 tokens (default: 4 full contexts)\n"
    "      --ignore-eos      keep generating past end-of-sequence tokens\n"
    "      --random-weights CONFIG.json\n"
    "                        a model of that config's shape with random weights instead of the\n"
    "                        checkpoint in -m DIR (which still gives the tokenizer): for speed\n"
    "                        measurements of shapes whose weights are not at hand\n"
    "  -d, --draft DIR       speculative decoding with this draft model (same vocabulary)\n"
    "      --draft-layers N  load only the draft's first N layers (with -d DIR = the target's\n"
    "                        folder: a truncated target as a stand-in draft)\n"
    "      --tree SPEC       chain:K | static:4,2,2,1 | dynamic:N[,depth=D,topk=K] | FILE.json\n"
    "                        (default chain:4)\n"
    "      --compare         also decode with the target alone and report its speed\n"
    "      --json            print one JSON object with the text and statistics at the end\n"
    "  -h, --help            show this help\n"
    "\n"
    "example:\n"
    "  canopy generate --chat -p \"What is a B-tree?\" -n 128\n";

typedef struct gen_args {
  const char *model, *prompt, *file, *system, *draft, *tree, *random_weights;
  int max_tokens, chat, threads, ctx, kv_blocks, json, ignore_eos, draft_layers, compare, device, no_graphs;
  canopy_sampling_params sampling;
} gen_args;

static int parse(int argc, char **argv, gen_args *a) {
  enum { O_CHAT = 256, O_SYSTEM, O_TEMP, O_TOPK, O_TOPP, O_SEED, O_THREADS, O_CTX, O_KV_BLOCKS, O_JSON, O_IGNORE_EOS, O_TREE, O_DRAFT_LAYERS, O_COMPARE, O_DEVICE, O_RANDOM, O_NO_GRAPHS };
  struct option opts[] = {
      {"model", required_argument, 0, 'm'},   {"prompt", required_argument, 0, 'p'},
      {"file", required_argument, 0, 'f'},    {"max-tokens", required_argument, 0, 'n'},
      {"chat", no_argument, 0, O_CHAT},       {"system", required_argument, 0, O_SYSTEM},
      {"temp", required_argument, 0, O_TEMP}, {"top-k", required_argument, 0, O_TOPK},
      {"top-p", required_argument, 0, O_TOPP}, {"seed", required_argument, 0, O_SEED},
      {"threads", required_argument, 0, O_THREADS}, {"ctx", required_argument, 0, O_CTX},
      {"kv-blocks", required_argument, 0, O_KV_BLOCKS},
      {"json", no_argument, 0, O_JSON},       {"ignore-eos", no_argument, 0, O_IGNORE_EOS},
      {"draft", required_argument, 0, 'd'},   {"tree", required_argument, 0, O_TREE},
      {"draft-layers", required_argument, 0, O_DRAFT_LAYERS}, {"compare", no_argument, 0, O_COMPARE},
      {"device", required_argument, 0, O_DEVICE}, {"random-weights", required_argument, 0, O_RANDOM},
      {"no-graphs", no_argument, 0, O_NO_GRAPHS},
      {"help", no_argument, 0, 'h'},          {0, 0, 0, 0}};
  *a = (gen_args){.max_tokens = 256, .sampling = canopy_sampling_default_params()};
  int c, rc = 0;
  double num = 0;
  optind = 1;
  while (!rc && (c = getopt_long(argc, argv, "m:p:f:n:d:h", opts, NULL)) != -1) {
    switch (c) {
    case 'm': a->model = optarg; break;
    case 'p': a->prompt = optarg; break;
    case 'f': a->file = optarg; break;
    case 'n': rc = cli_parse_int("generate", "--max-tokens", optarg, 1, &a->max_tokens); break;
    case O_CHAT: a->chat = 1; break;
    case O_SYSTEM: a->system = optarg; break;
    case O_TEMP: rc = cli_parse_double("generate", "--temp", optarg, 0, 100, &num), a->sampling.temperature = (float)num; break;
    case O_TOPK: rc = cli_parse_int("generate", "--top-k", optarg, 0, &a->sampling.top_k); break;
    case O_TOPP: rc = cli_parse_double("generate", "--top-p", optarg, 1e-6, 1, &num), a->sampling.top_p = (float)num; break;
    case O_SEED: rc = cli_parse_u64("generate", "--seed", optarg, &a->sampling.seed); break;
    case O_THREADS: rc = cli_parse_int("generate", "--threads", optarg, 1, &a->threads); break;
    case O_CTX: rc = cli_parse_int("generate", "--ctx", optarg, 1, &a->ctx); break;
    case O_KV_BLOCKS: rc = cli_parse_int("generate", "--kv-blocks", optarg, 1, &a->kv_blocks); break;
    case O_JSON: a->json = 1; break;
    case O_IGNORE_EOS: a->ignore_eos = 1; break;
    case 'd': a->draft = optarg; break;
    case O_TREE: a->tree = optarg; break;
    case O_DRAFT_LAYERS: rc = cli_parse_int("generate", "--draft-layers", optarg, 1, &a->draft_layers); break;
    case O_COMPARE: a->compare = 1; break;
    case O_DEVICE: rc = cli_parse_device("generate", optarg, &a->device); break;
    case O_RANDOM: a->random_weights = optarg; break;
    case O_NO_GRAPHS: a->no_graphs = 1; break;
    case 'h': fputs(usage, stdout); return -1;
    default: fputs(usage, stderr); return 2;
    }
  }
  if (rc) return rc;
  if (optind != argc || !!a->prompt == !!a->file) {
    fprintf(stderr, "canopy: generate: give exactly one of -p TEXT or -f FILE\n\n%s", usage);
    return 2;
  }
  return 0;
}

static int tokenize_all(canopy_tokenizer *tok, const char *text, int32_t **ids, int *n) {
  int cap = (int)strlen(text) + 16;
  *ids = malloc(sizeof **ids * (size_t)cap);
  if (!*ids) return CANOPY_ERR_NO_MEMORY;
  int st = canopy_tokenize(tok, text, strlen(text), 0, *ids, cap, n);
  if (st == CANOPY_ERR_BUFFER) {
    int32_t *bigger = realloc(*ids, sizeof **ids * (size_t)*n);
    if (!bigger) return CANOPY_ERR_NO_MEMORY;
    *ids = bigger;
    st = canopy_tokenize(tok, text, strlen(text), 0, *ids, *n, n);
  }
  return st;
}

/* Where generated text goes: streamed to stdout, or collected for --json. */
typedef struct sink {
  int collect;
  char *text;
  size_t len, cap;
} sink;

static int emit(sink *o, const char *piece, size_t n) {
  if (!o->collect) {
    fwrite(piece, 1, n, stdout);
    fflush(stdout);
    return 0;
  }
  if (o->len + n + 1 > o->cap) {
    size_t cap = 2 * (o->len + n + 1);
    char *bigger = realloc(o->text, cap);
    if (!bigger) return -1;
    o->text = bigger;
    o->cap = cap;
  }
  memcpy(o->text + o->len, piece, n);
  o->text[o->len += n] = '\0';
  return 0;
}

/* Target-only decoding of the same prompt and length, for --compare: tokens per second. */
static double target_only_tok_s(canopy_model *model, const canopy_session_params *sp, const int32_t *ids, int n,
                                int n_new) {
  canopy_session_params plain = *sp;
  plain.draft = NULL;
  plain.max_tokens = n_new > 0 ? n_new : 1;
  plain.stop_at_eos = 0;
  canopy_session *s;
  if (canopy_session_create(model, &plain, &s)) return 0;
  int32_t t;
  if (!canopy_session_append(s, ids, n))
    while (canopy_session_next(s, &t) == CANOPY_OK) {}
  canopy_stats st;
  canopy_session_get_stats(s, &st);
  canopy_session_free(s);
  return st.decode_s > 0 ? st.n_generated / st.decode_s : 0;
}

static void print_json(const char *text, const int32_t *out, const canopy_stats *s, double compare_tok_s) {
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "text", text);
  cJSON *ids = cJSON_AddArrayToObject(o, "token_ids");
  for (int i = 0; i < s->n_generated; i++) cJSON_AddItemToArray(ids, cJSON_CreateNumber(out[i]));
  cJSON_AddNumberToObject(o, "n_prompt", s->n_prompt);
  cJSON_AddNumberToObject(o, "n_prompt_reused", s->n_reused);
  cJSON_AddNumberToObject(o, "n_generated", s->n_generated);
  cJSON_AddNumberToObject(o, "forward_passes", s->forward_passes);
  cJSON_AddNumberToObject(o, "prefill_s", s->prefill_s);
  cJSON_AddNumberToObject(o, "decode_s", s->decode_s);
  cJSON_AddNumberToObject(o, "prefill_tok_s", s->prefill_s > 0 ? (s->n_prompt - s->n_reused) / s->prefill_s : 0);
  cJSON_AddNumberToObject(o, "decode_tok_s", s->decode_s > 0 ? s->n_generated / s->decode_s : 0);
  if (s->spec_steps > 0) {
    cJSON_AddNumberToObject(o, "target_forwards", s->forward_passes);
    cJSON_AddNumberToObject(o, "draft_forwards", s->draft_forwards);
    cJSON_AddNumberToObject(o, "spec_steps", s->spec_steps);
    cJSON_AddNumberToObject(o, "mean_accepted_len", (double)s->spec_tokens / s->spec_steps);
    cJSON_AddNumberToObject(o, "draft_s", s->draft_s);
    cJSON_AddNumberToObject(o, "verify_s", s->verify_s);
    if (compare_tok_s > 0) {
      cJSON_AddNumberToObject(o, "target_only_decode_tok_s", compare_tok_s);
      cJSON_AddNumberToObject(o, "speedup", s->decode_s > 0 ? s->n_generated / s->decode_s / compare_tok_s : 0);
    }
    cJSON *by_depth = cJSON_AddArrayToObject(o, "accept_rate_by_depth");
    for (int d = 0; d < CANOPY_STATS_MAX_DEPTH && s->offered_depth[d] > 0; d++)
      cJSON_AddItemToArray(by_depth, cJSON_CreateNumber((double)s->accept_depth[d] / s->offered_depth[d]));
  }
  char *str = cJSON_PrintUnformatted(o);
  if (str) puts(str);
  free(str);
  cJSON_Delete(o);
}

int cli_generate(int argc, char **argv) {
  gen_args a;
  int rc = parse(argc, argv, &a);
  if (rc) return rc < 0 ? 0 : rc;
  const char *dir = cli_model_dir(a.model);
  char *prompt = a.file ? cli_read_file(a.file) : strdup(a.prompt);
  if (!prompt) {
    fprintf(stderr, "canopy: generate: cannot read prompt file '%s': %s\n", a.file ? a.file : "-", strerror(errno));
    return 1;
  }

  canopy_tokenizer *tok = NULL;
  canopy_model *model = NULL;
  canopy_session *sess = NULL;
  canopy_model *draft = NULL;
  canopy_detok_stream *stream = NULL;
  int32_t *ids = NULL, *out = NULL;
  char *rendered = NULL;
  sink o = {.collect = a.json};
  rc = 1;

  if (canopy_tokenizer_load(dir, &tok)) { cli_fail("loading the tokenizer"); goto done; }
  if (a.chat) {
    canopy_chat_message msgs[2];
    int n = 0;
    if (a.system) msgs[n++] = (canopy_chat_message){"system", a.system};
    msgs[n++] = (canopy_chat_message){"user", prompt};
    if (canopy_chat_apply(tok, msgs, n, 1, &rendered)) { cli_fail("applying the chat template"); goto done; }
  }
  int n_ids = 0;
  if (tokenize_all(tok, rendered ? rendered : prompt, &ids, &n_ids)) { cli_fail("tokenizing the prompt"); goto done; }
  if (n_ids == 0) { fprintf(stderr, "canopy: generate: the prompt is empty\n"); goto done; }

  canopy_model_params mp = canopy_model_default_params();
  mp.n_threads = a.threads;
  mp.device = a.device;
  if (a.no_graphs) mp.cuda_graphs = 0;
  mp.max_context = a.ctx;
  mp.kv_blocks = a.kv_blocks;
  mp.random_weights = a.random_weights;
  if (canopy_model_load(dir, &mp, &model)) { cli_fail("loading the model"); goto done; }
  if (a.draft) {
    canopy_model_params dp = mp;
    dp.n_layers = a.draft_layers;
    dp.random_weights = NULL; /* the draft is always a checkpoint */
    if (canopy_model_load(a.draft, &dp, &draft)) { cli_fail("loading the draft model"); goto done; }
  }
  canopy_session_params sp = canopy_session_default_params();
  sp.sampling = a.sampling;
  sp.draft = draft;
  sp.tree = a.tree;
  sp.max_tokens = a.max_tokens;
  sp.stop_at_eos = !a.ignore_eos;
  if (canopy_session_create(model, &sp, &sess)) { cli_fail("creating a session"); goto done; }
  if (canopy_session_append(sess, ids, n_ids)) { cli_fail("processing the prompt"); goto done; }
  if (canopy_detok_stream_create(tok, 1, &stream)) { cli_fail("decoding"); goto done; }

  out = malloc(sizeof *out * (size_t)a.max_tokens);
  if (!out) goto done;
  int32_t t;
  int st, n_out = 0;
  char piece[256];
  size_t plen;
  while ((st = canopy_session_next(sess, &t)) == CANOPY_OK) {
    out[n_out++] = t;
    if (canopy_detok_stream_push(stream, t, piece, sizeof piece, &plen)) { cli_fail("decoding"); goto done; }
    if (emit(&o, piece, plen)) goto done;
  }
  if (st != CANOPY_DONE) { cli_fail("generating"); goto done; }
  if (canopy_detok_stream_flush(stream, piece, sizeof piece, &plen) || emit(&o, piece, plen)) goto done;
  canopy_stats s;
  canopy_session_get_stats(sess, &s);
  double compare_tok_s = a.compare ? target_only_tok_s(model, &sp, ids, n_ids, s.n_generated) : 0;
  if (a.json) {
    print_json(o.text ? o.text : "", out, &s, compare_tok_s);
  } else {
    putchar('\n');
    fflush(stdout); /* before the statistics on stderr */
  }
  fprintf(stderr, "prompt: %d tokens (%d from the prefix cache) in %.3f s, %.1f tok/s\n", s.n_prompt, s.n_reused,
          s.prefill_s, s.prefill_s > 0 ? (s.n_prompt - s.n_reused) / s.prefill_s : 0.0);
  fprintf(stderr, "decode: %d tokens in %.3f s, %.2f tok/s (%d forward passes)\n", s.n_generated, s.decode_s,
          s.decode_s > 0 ? s.n_generated / s.decode_s : 0.0, s.forward_passes);
  if (s.spec_steps > 0)
    fprintf(stderr, "speculation: %d steps, %.2f tokens per target forward, draft %.3f s, verify %.3f s\n",
            s.spec_steps, (double)s.spec_tokens / s.spec_steps, s.draft_s, s.verify_s);
  if (compare_tok_s > 0)
    fprintf(stderr, "target only: %.2f tok/s; speedup %.2fx\n", compare_tok_s,
            s.decode_s > 0 ? s.n_generated / s.decode_s / compare_tok_s : 0.0);
  rc = 0;
done:
  canopy_detok_stream_free(stream);
  canopy_session_free(sess);
  canopy_model_free(draft);
  canopy_model_free(model);
  canopy_tokenizer_free(tok);
  free(ids);
  free(out);
  free(o.text);
  free(rendered);
  free(prompt);
  return rc;
}
