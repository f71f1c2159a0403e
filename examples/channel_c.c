/* channel_c: a channel between two C processes: the parent publishes, a forked child subscribes.
 *
 * Build: gcc -std=c11 -Wall -Wextra -Werror -Iinclude examples/channel_c.c -Ltarget/release -lzcbuf
 * Run:   LD_LIBRARY_PATH=target/release ./a.out [NAME] [MESSAGES]
 *
 * The parent creates channel NAME (default "zcbuf-channel-c-PID") for messages of 16 float64
 * values (4 slots, block policy) and forks. The child (which must not use the parent's publisher
 * handle: a fork child gets its own endpoints) subscribes, tells the parent through a pipe, and
 * receives until the end of the stream, checking that message i has sequence number i and holds
 * i + k / 16.0 at index k; it keeps each message until it has read the next one, releasing them
 * with zcbuf_sub_release. The parent fills half of the messages in place (zcbuf_pub_loan +
 * zcbuf_pub_send) and copies the other half in (zcbuf_pub_send_copy), closes the stream, frees
 * its handle and waits for the child; no name is left in /dev/shm. Prints "c channel ok messages=N" and exits 0 when both sides agree.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "zcbuf.h"

#define VALUES 16

static int fail(const char *who, const char *what, int32_t st) {
    char msg[512];
    zcbuf_last_error(msg, sizeof msg);
    fprintf(stderr, "channel_c %s: %s gave %d (%s): %s\n", who, what, st, zcbuf_status_name(st),
            msg);
    return 2;
}

static double value(uint64_t i, int k) { return (double)i + (double)k / VALUES; }

/* The child: subscribe, say so on `ready`, receive until the end of the stream. */
static int subscriber(const char *name, int ready, uint64_t expect) {
    uint64_t sub = 0;
    zcbuf_channel_t desc;
    int32_t st = zcbuf_subscribe(name, &sub, &desc);
    if (st != ZCBUF_OK) {
        return fail("child", "zcbuf_subscribe", st);
    }
    if (strcmp(desc.dtype, "<f8") != 0 || desc.ndim != 1 || desc.shape[0] != VALUES) {
        fprintf(stderr, "channel_c child: messages are %s of %u dims\n", desc.dtype, desc.ndim);
        return 3;
    }
    if (write(ready, "s", 1) != 1) {
        return 4;
    }
    close(ready);
    zcbuf_message_t prev = {0}, m;
    int have_prev = 0;
    uint64_t n = 0;
    for (;;) {
        st = zcbuf_sub_recv(sub, 10 * 1000 * 1000, &m);
        if (st == ZCBUF_ECLOSED) {
            break;
        }
        if (st != ZCBUF_OK) {
            return fail("child", "zcbuf_sub_recv", st);
        }
        if (m.seq != n || m.len != VALUES * sizeof(double)) {
            fprintf(stderr, "channel_c child: message %llu has seq %llu, %zu bytes\n",
                    (unsigned long long)n, (unsigned long long)m.seq, m.len);
            return 3;
        }
        for (int k = 0; k < VALUES; k++) {
            double v;
            memcpy(&v, m.ptr + k * sizeof v, sizeof v);
            if (v != value(n, k)) {
                fprintf(stderr, "channel_c child: message %llu value %d is %g\n",
                        (unsigned long long)n, k, v);
                return 3;
            }
        }
        /* The previous message, kept until now, must not have changed. */
        if (have_prev) {
            double v;
            memcpy(&v, prev.ptr, sizeof v);
            if (v != value(n - 1, 0)) {
                fprintf(stderr, "channel_c child: a kept message changed\n");
                return 3;
            }
            st = zcbuf_sub_release(sub, prev.slot);
            if (st != ZCBUF_OK) {
                return fail("child", "zcbuf_sub_release", st);
            }
        }
        prev = m;
        have_prev = 1;
        n++;
    }
    if (have_prev && (st = zcbuf_sub_release(sub, prev.slot)) != ZCBUF_OK) {
        return fail("child", "zcbuf_sub_release", st);
    }
    if ((st = zcbuf_sub_close(sub)) != ZCBUF_OK) {
        return fail("child", "zcbuf_sub_close", st);
    }
    if (n != expect) {
        fprintf(stderr, "channel_c child: %llu messages, %llu expected\n", (unsigned long long)n,
                (unsigned long long)expect);
        return 3;
    }
    return 0;
}

int main(int argc, char **argv) {
    char defname[64];
    snprintf(defname, sizeof defname, "zcbuf-channel-c-%ld", (long)getpid());
    const char *name = argc > 1 ? argv[1] : defname;
    uint64_t count = argc > 2 ? strtoull(argv[2], NULL, 10) : 1000;

    const uint64_t shape[1] = {VALUES};
    uint64_t pub = 0;
    int32_t st = zcbuf_publish(name, "<f8", sizeof(double), shape, 1, 4, ZCBUF_POLICY_BLOCK, 4,
                               &pub, NULL);
    if (st != ZCBUF_OK) {
        return fail("parent", "zcbuf_publish", st);
    }
    int fds[2];
    if (pipe(fds) != 0) {
        perror("pipe");
        return 4;
    }
    fflush(stdout);
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 4;
    }
    if (child == 0) {
        close(fds[0]);
        _exit(subscriber(name, fds[1], count));
    }
    close(fds[1]);
    char c;
    if (read(fds[0], &c, 1) != 1) {
        fprintf(stderr, "channel_c parent: the child died before subscribing\n");
        return 4;
    }
    close(fds[0]);

    for (uint64_t i = 0; i < count; i++) {
        double msg[VALUES];
        for (int k = 0; k < VALUES; k++) {
            msg[k] = value(i, k);
        }
        uint64_t seq = 0;
        if (i % 2 == 0) {
            uint8_t *slot = NULL;
            uint32_t k = 0;
            if ((st = zcbuf_pub_loan(pub, 10 * 1000 * 1000, &slot, &k)) != ZCBUF_OK) {
                return fail("parent", "zcbuf_pub_loan", st);
            }
            memcpy(slot, msg, sizeof msg); /* (a real producer computes into the slot) */
            st = zcbuf_pub_send(pub, k, &seq);
        } else {
            st = zcbuf_pub_send_copy(pub, (const uint8_t *)msg, sizeof msg, 10 * 1000 * 1000,
                                     &seq);
        }
        if (st != ZCBUF_OK) {
            return fail("parent", "send", st);
        }
        if (seq != i) {
            fprintf(stderr, "channel_c parent: message %llu got seq %llu\n",
                    (unsigned long long)i, (unsigned long long)seq);
            return 3;
        }
    }
    if ((st = zcbuf_pub_close(pub)) != ZCBUF_OK) { /* the end of the stream */
        return fail("parent", "zcbuf_pub_close", st);
    }
    if ((st = zcbuf_pub_free(pub)) != ZCBUF_OK) { /* and the handle */
        return fail("parent", "zcbuf_pub_free", st);
    }
    int status = 0;
    if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "channel_c parent: the child failed (status %d)\n", status);
        return 5;
    }
    printf("c channel ok messages=%llu\n", (unsigned long long)count);
    return 0;
}
