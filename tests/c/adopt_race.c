/* Regression for a self-deadlock found in review: after a fork, an open (which makes a new hold
 * because the old one may be shared with the child) raced the free of the old hold's last
 * mapping; the open then dropped the old hold's last reference while holding the hold map's
 * lock, and Hold::drop took that lock again. Usage: adopt_race NAME ROUNDS. Exit 0: no
 * deadlock; 2: a thread stuck for 3 s (a deadlock). A child process keeps NAME held throughout. */
#define _DEFAULT_SOURCE
#include "zcbuf.h"
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static atomic_int go, done_a;
static uint64_t id1, id2;
static int delay;
static const char *name;

static void spin(int n) {
    for (volatile int i = 0; i < n; i++) {
    }
}
static void *opener(void *x) {
    (void)x;
    while (!atomic_load(&go)) {
    }
    zcbuf_open_shared(name, 0, &id2);
    atomic_store(&done_a, 1);
    return NULL;
}
static void *freer(void *x) {
    (void)x;
    while (!atomic_load(&go)) {
    }
    spin(delay);
    zcbuf_free(id1);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) return 1;
    name = argv[1];
    long rounds = atol(argv[2]);
    uint64_t keep;
    if (zcbuf_create_shared(name, 4096, &keep)) return 1;
    int p[2];
    if (pipe(p)) return 1;
    pid_t holder = fork(); /* holds NAME (inherited) until the pipe closes */
    if (holder == 0) {
        char c;
        close(p[1]);
        (void)!read(p[0], &c, 1);
        _exit(0);
    }
    close(p[0]);
    zcbuf_free(keep);
    int rc = 0;
    for (long k = 0; k < rounds; k++) {
        if (zcbuf_open_shared(name, 0, &id1)) {
            rc = 1;
            break;
        }
        pid_t c = fork();
        if (c == 0) _exit(0);
        waitpid(c, NULL, 0);
        atomic_store(&go, 0);
        atomic_store(&done_a, 0);
        delay = rand() % 3000;
        pthread_t ta, tb;
        pthread_create(&ta, NULL, opener, NULL);
        pthread_create(&tb, NULL, freer, NULL);
        atomic_store(&go, 1);
        for (int w = 0; w < 3000 && !atomic_load(&done_a); w++) usleep(1000);
        if (!atomic_load(&done_a)) {
            printf("round %ld: the opener is stuck in zcbuf_open_shared: deadlock\n", k);
            fflush(stdout);
            kill(holder, SIGKILL);
            _exit(2);
        }
        pthread_join(ta, NULL);
        pthread_join(tb, NULL);
        id1 = id2;
        zcbuf_free(id1);
    }
    close(p[1]);
    waitpid(holder, NULL, 0);
    return rc;
}
