/* The thread-local error slot behind canopy_last_error(): the only mutable global in canopy. */
#ifndef CANOPY_COMMON_ERROR_H
#define CANOPY_COMMON_ERROR_H

#include "canopy.h"

/* Records a printf-style message for this thread and returns `status`, so that a failing
 * path reads `return cn_error(CANOPY_ERR_FORMAT, "%s: ...", path);`. */
int cn_error(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prefixes the current message with more context ("loading model X: <old message>"). */
int cn_error_wrap(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

void cn_error_clear(void);

#endif
