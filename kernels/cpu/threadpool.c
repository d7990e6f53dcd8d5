/* A small fork-join pool. The forward calls it a few times per layer with jobs of 20-200 us, so
 * between jobs a worker first spins on the job counter and only then sleeps on a condition
 * variable: waking a sleeping thread on this 2-vCPU VM took longer than a whole job, so the
 * caller used to finish every item alone while the worker was still waking (a 4-token matmul ran
 * no faster on 2 threads than on 1). The spin is bounded, so an idle engine still sleeps. */
#include "common/error.h"
#include "kernels/cpu/ops.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

/* How long a worker spins before it sleeps: longer than the gaps between the ops of one forward,
 * short enough that a pool left idle (another model's forward, sampling) gives its core back. */
#define SPIN_NS 100000
/* How long the caller spins on a slow worker before it yields: a worker preempted by another
 * process would otherwise be waited on by a spinning core. */
#define WAIT_NS 50000

struct cn_threadpool {
  int n_threads;              /* workers + the caller */
  pthread_t *workers;
  pthread_mutex_t mu;         /* guards sleepers and the sleep/wake handshake */
  pthread_cond_t start;
  atomic_uint_fast64_t generation; /* bumped per job (release) after fn/arg/n are set */
  atomic_int pending;         /* workers still inside the current job */
  int sleepers;               /* workers waiting on `start` */
  atomic_int stop;
  void (*fn)(void *, int);
  void *arg;
  int n;
  atomic_int next;            /* next item index to claim */
};

static int64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void run_items(cn_threadpool *tp) {
  for (;;) {
    int i = atomic_fetch_add(&tp->next, 1);
    if (i >= tp->n) return;
    tp->fn(tp->arg, i);
  }
}

/* Waits for a generation other than `seen` (or stop) and returns it. */
static uint64_t wait_job(cn_threadpool *tp, uint64_t seen) {
  uint64_t g;
  int64_t until = now_ns() + SPIN_NS;
  for (int i = 1;; i++) {
    if ((g = atomic_load_explicit(&tp->generation, memory_order_acquire)) != seen || atomic_load(&tp->stop))
      return g;
    cpu_relax();
    if (i % 64 == 0 && now_ns() > until) break;
  }
  pthread_mutex_lock(&tp->mu);
  tp->sleepers++;
  /* The caller bumps the generation before it takes the mutex to look for sleepers, so a bump
   * that lands after this check finds this worker counted and signals it. */
  while ((g = atomic_load(&tp->generation)) == seen && !atomic_load(&tp->stop)) pthread_cond_wait(&tp->start, &tp->mu);
  tp->sleepers--;
  pthread_mutex_unlock(&tp->mu);
  return g;
}

static void *worker_main(void *p) {
  cn_threadpool *tp = p;
  uint64_t seen = 0;
  for (;;) {
    seen = wait_job(tp, seen);
    if (atomic_load(&tp->stop)) break;
    run_items(tp);
    atomic_fetch_sub_explicit(&tp->pending, 1, memory_order_release);
  }
  return NULL;
}

int cn_threadpool_create(int n_threads, cn_threadpool **out) {
  cn_threadpool *tp = calloc(1, sizeof *tp);
  if (!tp) return cn_error(CANOPY_ERR_NO_MEMORY, "thread pool: out of memory");
  tp->n_threads = n_threads < 1 ? 1 : n_threads;
  pthread_mutex_init(&tp->mu, NULL);
  pthread_cond_init(&tp->start, NULL);
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
  atomic_store(&tp->stop, 1);
  pthread_cond_broadcast(&tp->start);
  pthread_mutex_unlock(&tp->mu);
  for (int i = 0; tp->workers && i < tp->n_threads - 1; i++) pthread_join(tp->workers[i], NULL);
  free(tp->workers);
  pthread_mutex_destroy(&tp->mu);
  pthread_cond_destroy(&tp->start);
  free(tp);
}

int cn_threadpool_size(const cn_threadpool *tp) { return tp ? tp->n_threads : 1; }

void cn_threadpool_run(cn_threadpool *tp, int n, void (*fn)(void *, int), void *arg) {
  if (!tp || tp->n_threads <= 1 || n <= 1) {
    for (int i = 0; i < n; i++) fn(arg, i);
    return;
  }
  /* Every worker finished the previous job (pending reached 0), so none reads these now. */
  tp->fn = fn;
  tp->arg = arg;
  tp->n = n;
  atomic_store_explicit(&tp->next, 0, memory_order_relaxed);
  atomic_store_explicit(&tp->pending, tp->n_threads - 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&tp->generation, 1, memory_order_seq_cst);
  pthread_mutex_lock(&tp->mu);
  if (tp->sleepers > 0) pthread_cond_broadcast(&tp->start);
  pthread_mutex_unlock(&tp->mu);
  run_items(tp);
  int64_t until = 0;
  for (int i = 1; atomic_load_explicit(&tp->pending, memory_order_acquire) > 0; i++) {
    if (until == 0) until = now_ns() + WAIT_NS;
    if (i % 64 == 0 && now_ns() > until) sched_yield();
    else cpu_relax();
  }
}
