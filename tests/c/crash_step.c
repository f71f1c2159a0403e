/* crash_step: one deterministic zcbuf step per run, for tests/python/test_crash_matrix.py, which
 * runs it under `strace -e inject=SYSCALL:signal=KILL:when=N` to kill it at every system call of
 * the step.
 *
 * Build: gcc -std=c11 -Wall -Wextra -Werror -Iinclude tests/c/crash_step.c -Ltarget/release -lzcbuf
 *
 *   crash_step create NAME          create shared NAME (1 MiB), write the pattern, free, exit 0
 *   crash_step open_free NAME       open NAME, acquire, check the pattern, release, free
 *   crash_step open_wait_free NAME  open NAME, acquire, check the pattern, print "ready", wait for
 *                                   a line (or EOF) on stdin, then release and free
 *   crash_step hold NAME            same as open_wait_free (a holder that waits on stdin)
 *   crash_step leave NAME           create NAME, write the pattern, then SIGKILL itself: leaves a
 *                                   complete segment that no process holds
 *   crash_step hold_new NAME        create NAME, write the pattern, print "ready", wait for a line
 *                                   (or EOF) on stdin, free (SIGKILL it to leave a segment behind)
 *   crash_step create_on_cue NAME   print "ready", wait for a line (or EOF) on stdin, then do what
 *                                   create does (lets a test make the leftover it replaces
 *                                   unheld just before, leaving another process's gc no time)
 *
 * The zcbuf calls of each mode are bracketed by two getppid() calls, which zcbuf never makes, so
 * a trace of a dry run shows which occurrences of each system call belong to the step.
 *
 * Exit status: 0 done; 1 usage; 2 a zcbuf call failed (status and message on stderr);
 * 3 the pattern was wrong.
 */
#define _POSIX_C_SOURCE 200809L

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "zcbuf.h"

#define SIZE ((size_t)1 << 20)

/* The byte at offset i: what the pytest side checks too ((i * 7 + 1) & 0xff). */
static uint8_t pattern_at(size_t i) { return (uint8_t)(i * 7u + 1u); }

static void fail(const char *what, int32_t st) {
    char msg[512];
    zcbuf_last_error(msg, sizeof msg);
    fprintf(stderr, "crash_step: %s gave %d (%s): %s\n", what, st, zcbuf_status_name(st), msg);
    exit(2);
}

#define CALL(expr)                     \
    do {                               \
        int32_t st_ = (expr);          \
        if (st_ != ZCBUF_OK) {         \
            fail(#expr, st_);          \
        }                              \
    } while (0)

static void marker(void) { (void)getppid(); }

static void fill(uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        p[i] = pattern_at(i);
    }
}

static void check(const uint8_t *p, size_t n) {
    if (n != SIZE) {
        fprintf(stderr, "crash_step: size %zu, wanted %zu\n", n, SIZE);
        exit(3);
    }
    for (size_t i = 0; i < n; i++) {
        if (p[i] != pattern_at(i)) {
            fprintf(stderr, "crash_step: byte %zu is %u, wanted %u\n", i, p[i], pattern_at(i));
            exit(3);
        }
    }
}

static void wait_stdin(void) {
    char c;
    while (read(0, &c, 1) == 1 && c != '\n') {
    }
}

static void say_ready(void) {
    static const char msg[] = "ready\n";
    if (write(1, msg, sizeof msg - 1) != (ssize_t)(sizeof msg - 1)) {
        exit(2);
    }
}

static uint64_t create_filled(const char *name) {
    uint64_t id = 0;
    uint8_t *p = NULL;
    size_t n = 0;
    CALL(zcbuf_create_shared(name, SIZE, &id));
    CALL(zcbuf_acquire(id, &p, &n));
    fill(p, n);
    CALL(zcbuf_release(id));
    return id;
}

static uint64_t open_checked(const char *name) {
    uint64_t id = 0;
    uint8_t *p = NULL;
    size_t n = 0;
    CALL(zcbuf_open_shared(name, 0, &id));
    CALL(zcbuf_acquire(id, &p, &n));
    check(p, n);
    CALL(zcbuf_release(id));
    return id;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: crash_step MODE NAME (modes: see the top of crash_step.c)\n");
        return 1;
    }
    const char *mode = argv[1], *name = argv[2];
    if (strcmp(mode, "create") == 0) {
        marker();
        uint64_t id = create_filled(name);
        CALL(zcbuf_free(id));
        marker();
    } else if (strcmp(mode, "open_free") == 0) {
        marker();
        uint64_t id = open_checked(name);
        CALL(zcbuf_free(id));
        marker();
    } else if (strcmp(mode, "open_wait_free") == 0 || strcmp(mode, "hold") == 0) {
        marker();
        uint64_t id = open_checked(name);
        say_ready();
        wait_stdin();
        CALL(zcbuf_free(id));
        marker();
    } else if (strcmp(mode, "create_on_cue") == 0) {
        say_ready();
        wait_stdin();
        marker();
        uint64_t id = create_filled(name);
        CALL(zcbuf_free(id));
        marker();
    } else if (strcmp(mode, "hold_new") == 0) {
        uint64_t id = create_filled(name);
        say_ready();
        wait_stdin();
        CALL(zcbuf_free(id));
    } else if (strcmp(mode, "leave") == 0) {
        (void)create_filled(name);
        raise(SIGKILL);
        return 4; /* not reached */
    } else {
        fprintf(stderr, "crash_step: unknown mode %s\n", mode);
        return 1;
    }
    return 0;
}
