/* pthread_exit_holder: a holder of a shared segment whose main thread has exited.
 *
 * Build: gcc -std=c11 -Wall -Wextra -Werror -pthread -Iinclude tests/c/pthread_exit_holder.c \
 *            -Ltarget/release -lzcbuf
 *
 *   pthread_exit_holder NAME
 *
 * Opens shared segment NAME (zcbuf_open_shared + zcbuf_acquire), starts a second thread, prints
 * "ready" and ends the main thread with pthread_exit(NULL): the process lives on with a zombie
 * main thread (what /proc shows as state Z for the process). The second thread waits for a line
 * (or EOF) on stdin, then checks that the mapping still holds the first byte it saw, writes a
 * byte into the buffer, releases the lease, frees the buffer and ends the process with exit(0).
 *
 * Exit status: 0 done; 1 usage; 2 a zcbuf or pthread call failed; 3 the buffer changed under it.
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "zcbuf.h"

static uint64_t id;
static uint8_t *ptr;
static size_t len;
static uint8_t first;

static void fail(const char *what, int32_t st) {
    char msg[512];
    zcbuf_last_error(msg, sizeof msg);
    fprintf(stderr, "pthread_exit_holder: %s gave %d (%s): %s\n", what, st, zcbuf_status_name(st),
            msg);
    exit(2);
}

#define CALL(expr)             \
    do {                       \
        int32_t st_ = (expr);  \
        if (st_ != ZCBUF_OK) { \
            fail(#expr, st_);  \
        }                      \
    } while (0)

static void *waiter(void *arg) {
    (void)arg;
    char c;
    while (read(0, &c, 1) == 1 && c != '\n') {
    }
    if (len == 0 || ptr[0] != first) {
        fprintf(stderr, "pthread_exit_holder: buffer changed under the lease\n");
        exit(3);
    }
    ptr[len - 1] = (uint8_t)(ptr[len - 1] + 1); /* the mapping is still ours to write */
    CALL(zcbuf_release(id));
    CALL(zcbuf_free(id));
    exit(0);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: pthread_exit_holder NAME\n");
        return 1;
    }
    CALL(zcbuf_open_shared(argv[1], 0, &id));
    CALL(zcbuf_acquire(id, &ptr, &len));
    if (len > 0) {
        first = ptr[0];
    }
    pthread_t t;
    int e = pthread_create(&t, NULL, waiter, NULL);
    if (e != 0) {
        fprintf(stderr, "pthread_exit_holder: pthread_create failed (%d)\n", e);
        return 2;
    }
    printf("ready\n");
    fflush(stdout);
    pthread_exit(NULL);
}
