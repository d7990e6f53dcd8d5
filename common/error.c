#include "common/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char last_error[1024];

int cn_error(int status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(last_error, sizeof last_error, fmt, ap);
  va_end(ap);
  return status;
}

int cn_error_wrap(int status, const char *fmt, ...) {
  char prefix[512], old[sizeof last_error];
  memcpy(old, last_error, sizeof old);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(prefix, sizeof prefix, fmt, ap);
  va_end(ap);
  size_t k = strlen(prefix), room = sizeof last_error - 1;
  if (k > room - 2) k = room - 2;
  memcpy(last_error, prefix, k);
  memcpy(last_error + k, ": ", 2);
  size_t rest = strnlen(old, room - k - 2);
  memcpy(last_error + k + 2, old, rest);
  last_error[k + 2 + rest] = '\0';
  return status;
}

void cn_error_clear(void) { last_error[0] = '\0'; }

const char *canopy_last_error(void) { return last_error; }

const char *canopy_status_string(int status) {
  switch (status) {
  case CANOPY_OK: return "ok";
  case CANOPY_DONE: return "done";
  case CANOPY_ERR_INVALID_ARG: return "invalid argument";
  case CANOPY_ERR_IO: return "i/o error";
  case CANOPY_ERR_FORMAT: return "malformed file";
  case CANOPY_ERR_SHAPE: return "shape mismatch";
  case CANOPY_ERR_DTYPE: return "unsupported dtype";
  case CANOPY_ERR_UNSUPPORTED: return "unsupported";
  case CANOPY_ERR_NO_MEMORY: return "out of memory";
  case CANOPY_ERR_KV_EXHAUSTED: return "KV cache pool exhausted";
  case CANOPY_ERR_CONTEXT: return "context length exceeded";
  case CANOPY_ERR_UTF8: return "invalid UTF-8";
  case CANOPY_ERR_VOCAB_MISMATCH: return "vocabulary mismatch";
  case CANOPY_ERR_BUFFER: return "buffer too small";
  case CANOPY_ERR_DEVICE: return "device error";
  case CANOPY_ERR_CANCELLED: return "cancelled";
  default: return "unknown status";
  }
}
