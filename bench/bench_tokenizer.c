/* Tokenizer encode throughput on one core: MB/s and tokens/s, median of several runs.
 *
 *   bench_tokenizer [-t TOKENIZER] [-f TEXT_FILE] [-m MEGABYTES] [-r RUNS] [-c CHUNK_BYTES]
 *
 * TOKENIZER is a tokenizer.json or a folder with one (default: the SmolLM2 fixture). Without a
 * file the text is English generated from a fixed seed (varied sentences, numbers, punctuation,
 * newlines). The text is encoded in chunks of CHUNK_BYTES cut at line ends (default 64 KiB; 0 = one
 * call), as a server encoding many prompts would. */
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench/bench_util.h"
#include "canopy.h"

static const char *WORDS[] = {
    "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he",
    "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they", "you", "were", "their", "one",
    "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will", "would", "who", "so", "no",
    "model", "token", "speculative", "decoding", "verification", "attention", "memory", "bandwidth", "throughput",
    "government", "information", "development", "international", "environmental", "responsibility", "Tuesday",
    "London", "Paris", "researchers", "university", "experiment", "results", "significantly", "however", "although",
    "don't", "it's", "we've", "they'll", "I'm", "she'd", "couldn't", "e-mail", "state-of-the-art", "well-known"};
static const char *PUNCT[] = {".", ".", ".", ",", ",", ";", ":", "!", "?", " -", "...", "\"", ")"};

static uint64_t rng_next(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static char *generate(size_t bytes, size_t *len) {
  char *t = malloc(bytes + 256);
  uint64_t s = 42;
  size_t n = 0;
  const size_t nw = sizeof WORDS / sizeof *WORDS, np = sizeof PUNCT / sizeof *PUNCT;
  while (n < bytes) {
    int words = 4 + (int)(rng_next(&s) % 18);
    for (int i = 0; i < words; i++) {
      uint64_t r = rng_next(&s);
      const char *w = WORDS[r % nw];
      if (r % 97 == 0) n += (size_t)sprintf(t + n, "%s%llu", i ? " " : "", (unsigned long long)(r >> 40));
      else n += (size_t)sprintf(t + n, "%s%c%s", i ? " " : "", (i == 0 || r % 23 == 0) ? w[0] & ~0x20 : w[0], w + 1);
      if (i + 1 < words && r % 11 == 0) n += (size_t)sprintf(t + n, "%s", PUNCT[(r >> 8) % np]);
    }
    n += (size_t)sprintf(t + n, "%s", rng_next(&s) % 6 ? ". " : ".\n\n");
  }
  t[n] = '\0';
  *len = n;
  return t;
}

static char *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *t = malloc((size_t)n + 1);
  if (t && fread(t, 1, (size_t)n, f) != (size_t)n) {
    free(t);
    t = NULL;
  }
  fclose(f);
  if (t) {
    t[n] = '\0';
    *len = (size_t)n;
  }
  return t;
}

/* One pass over the text; returns the ids produced, or -1. */
static long encode_all(const canopy_tokenizer *tok, const char *text, size_t len, size_t chunk, int32_t *ids, int cap) {
  long total = 0;
  for (size_t pos = 0; pos < len;) {
    size_t end = chunk && pos + chunk < len ? pos + chunk : len;
    while (end < len && text[end - 1] != '\n') end++; /* whole lines (never mid-character) */
    int n = 0;
    if (canopy_tokenize(tok, text + pos, end - pos, 0, ids, cap, &n)) {
      fprintf(stderr, "bench_tokenizer: %s\n", canopy_last_error());
      return -1;
    }
    total += n;
    pos = end;
  }
  return total;
}

int main(int argc, char **argv) {
  const char *tok_path = "tests/fixtures/tokenizer/smollm2", *file = NULL;
  double mb = 4;
  int runs = 7, c;
  long chunk = 65536;
  while ((c = getopt(argc, argv, "t:f:m:r:c:h")) != -1) {
    switch (c) {
    case 't': tok_path = optarg; break;
    case 'f': file = optarg; break;
    case 'm': mb = atof(optarg); break;
    case 'r': runs = atoi(optarg); break;
    case 'c': chunk = atol(optarg); break;
    default:
      fprintf(stderr, "usage: %s [-t TOKENIZER] [-f TEXT_FILE] [-m MEGABYTES] [-r RUNS] [-c CHUNK_BYTES]\n", argv[0]);
      return c == 'h' ? 0 : 2;
    }
  }
  if (runs < 1 || runs > 1000 || mb <= 0 || chunk < 0) {
    fprintf(stderr, "bench_tokenizer: bad option value\n");
    return 2;
  }
  canopy_tokenizer *tok;
  if (canopy_tokenizer_load(tok_path, &tok)) {
    fprintf(stderr, "bench_tokenizer: %s\n", canopy_last_error());
    return 1;
  }
  size_t len;
  char *text = file ? read_file(file, &len) : generate((size_t)(mb * 1e6), &len);
  if (!text) {
    fprintf(stderr, "bench_tokenizer: cannot read %s\n", file);
    return 1;
  }
  int cap = (int)((chunk && (size_t)chunk < len ? (size_t)chunk * 2 : len) + 4096);
  int32_t *ids = malloc(sizeof *ids * (size_t)cap);
  double *secs = malloc(sizeof *secs * (size_t)runs);
  double t_cold = bench_now_s();
  long ntok = encode_all(tok, text, len, (size_t)chunk, ids, cap); /* warm-up (fills the word cache) */
  t_cold = bench_now_s() - t_cold;
  for (int r = 0; r < runs && ntok >= 0; r++) {
    double t0 = bench_now_s();
    ntok = encode_all(tok, text, len, (size_t)chunk, ids, cap);
    secs[r] = bench_now_s() - t0;
  }
  if (ntok < 0) return 1;
  qsort(secs, (size_t)runs, sizeof *secs, bench_cmp_double);
  double med = secs[runs / 2];
  printf("bench_tokenizer: %s, %.2f MB of %s in %s, %ld tokens (%.2f bytes/token)\n", tok_path, (double)len / 1e6,
         file ? file : "generated English", chunk ? "chunks of whole lines" : "one call", ntok, (double)len / (double)ntok);
  printf("bench_tokenizer: median of %d runs: %.2f MB/s, %.2f M tokens/s (fastest %.2f MB/s, slowest %.2f MB/s; "
         "first pass, cold word cache: %.2f MB/s)\n",
         runs, (double)len / 1e6 / med, (double)ntok / 1e6 / med, (double)len / 1e6 / secs[0],
         (double)len / 1e6 / secs[runs - 1], (double)len / 1e6 / t_cold);
  free(secs);
  free(ids);
  free(text);
  canopy_tokenizer_free(tok);
  return 0;
}
