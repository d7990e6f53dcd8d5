/* A small fork-join pool: the forward calls it a few times per layer, so workers wait on a
 * condition variable between jobs rather than being created per call. */
#include "common/error.h"
#include "kernels/cpu/ops.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

struct cn_threadpool {
  int n_threads;            /* workers + the caller */
  pthread_t *workers;
  pthread_mutex_t mu;
  pthread_cond_t start, done;
  uint64_t generation;      /* bumped per job; workers run once per generation */
  int pending;              /* workers still inside the current job */
  int stop;
  void (*fn)(void *, int);
  void *arg;
  int n;
  atomic_int next;          /* next item index to claim */
};

static void run_items(cn_threadpool *tp) {
  for (;;) {
    int i = atomic_fetch_add(&tp->next, 1);
    if (i >= tp->n) return;
    tp->fn(tp->arg, i);
  }
}

static void *worker_main(void *p) {
  cn_threadpool *tp = p;
  uint64_t seen = 0;
  pthread_mutex_lock(&tp->mu);
  for (;;) {
    while (!tp->stop && tp->generation == seen) pthread_cond_wait(&tp->start, &tp->mu);
    if (tp->stop) break;
    seen = tp->generation;
    pthread_mutex_unlock(&tp->mu);
    run_items(tp);
    pthread_mutex_lock(&tp->mu);
    if (--tp->pending == 0) pthread_cond_signal(&tp->done);
  }
  pthread_mutex_unlock(&tp->mu);
  return NULL;
}

int cn_threadpool_create(int n_threads, cn_threadpool **out) {
  cn_threadpool *tp = calloc(1, sizeof *tp);
  if (!tp) return cn_error(CANOPY_ERR_NO_MEMORY, "thread pool: out of memory");
  tp->n_threads = n_threads < 1 ? 1 : n_threads;
  pthread_mutex_init(&tp->mu, NULL);
  pthread_cond_init(&tp->start, NULL);
  pthread_cond_init(&tp->done, NULL);
  int n_workers = tp->n_threads - 1;
  if (n_workers > 0) {
    tp->workers = calloc((size_t)n_workers, sizeof *tp->workers);
    if (!tp->workers) {
      cn_threadpool_free(tp);
      return cn_error(CANOPY_ERR_NO_MEMORY, "thread pool: out of memory");
    }
    for (int i = 0; i < n_workers; i++) {
      if (pthread_create(&tp->workers[i], NULL, worker_main, tp) != 0) {
        tp->n_threads = i + 1;
        cn_threadpool_free(tp);
        return cn_error(CANOPY_ERR_NO_MEMORY, "thread pool: cannot start thread %d", i);
      }
    }
  }
  *out = tp;
  return CANOPY_OK;
}

void cn_threadpool_free(cn_threadpool *tp) {
  if (!tp) return;
  pthread_mutex_lock(&tp->mu);
  tp->stop = 1;
  pthread_cond_broadcast(&tp->start);
  pthread_mutex_unlock(&tp->mu);
  for (int i = 0; tp->workers && i < tp->n_threads - 1; i++) pthread_join(tp->workers[i], NULL);
  free(tp->workers);
  pthread_mutex_destroy(&tp->mu);
  pthread_cond_destroy(&tp->start);
  pthread_cond_destroy(&tp->done);
  free(tp);
}

int cn_threadpool_size(const cn_threadpool *tp) { return tp ? tp->n_threads : 1; }

void cn_threadpool_run(cn_threadpool *tp, int n, void (*fn)(void *, int), void *arg) {
  if (!tp || tp->n_threads <= 1 || n <= 1) {
    for (int i = 0; i < n; i++) fn(arg, i);
    return;
  }
  pthread_mutex_lock(&tp->mu);
  tp->fn = fn;
  tp->arg = arg;
  tp->n = n;
  atomic_store(&tp->next, 0);
  tp->pending = tp->n_threads - 1;
  tp->generation++;
  pthread_cond_broadcast(&tp->start);
  pthread_mutex_unlock(&tp->mu);
  run_items(tp);
  pthread_mutex_lock(&tp->mu);
  while (tp->pending > 0) pthread_cond_wait(&tp->done, &tp->mu);
  pthread_mutex_unlock(&tp->mu);
}
