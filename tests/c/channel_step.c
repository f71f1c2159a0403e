/* channel_step: one channel step per run, for tests/python/test_channel_crash.py, which runs it
 * under `strace -f -e inject=SYSCALL:signal=KILL:when=N` to kill it at every system call of the
 * step while the pytest process is the other side of the channel.
 *
 * Build: gcc -std=c11 -Wall -Wextra -Werror -Iinclude tests/c/channel_step.c -Ltarget/release -lzcbuf
 *
 * A publisher that closes stays alive until told to exit, so that the other side sees the
 * end of stream from a live publisher (test_channels.py checks the exit right after a close).
 *
 * Messages are "<u8" of shape [8] (64 bytes); message i holds the value i in every element.
 * The step's zcbuf calls sit between two getppid() calls (zcbuf never makes one), so a trace
 * shows which system calls belong to the step. "ready" and the like go to stdout, one per line;
 * "wait" means: read a line (or EOF) from stdin.
 *
 * C is the publisher (the pytest process subscribes):
 *   channel_step pub_create NAME   [step: zcbuf_publish(NAME, 4 slots, block)] ready, wait,
 *                                  send 0..2, "sent", wait, close, "closed", wait, free
 *   channel_step send NAME         publish NAME (8 slots, block), ready, wait, send 0..2,
 *                                  sleep 0.1 s, [step: send_copy 3], "done", wait, close,
 *                                  "closed", wait, free
 *   channel_step loan_send NAME    the same with [step: loan, fill, send 3]
 *   channel_step pub_close NAME    publish NAME, ready, wait, send 0..2, [step: close], "done",
 *                                  wait, free
 * C is a subscriber (the pytest process publishes):
 *   channel_step subscribe NAME    [step: zcbuf_subscribe(NAME)] ready, wait, recv+release one
 *                                  message, print "got V", wait, close
 *   channel_step recv NAME         subscribe, ready, [step: recv (waits for the message the
 *                                  test sends after "ready"), release], "got V", wait, close
 *   channel_step sub_close NAME    subscribe, ready, wait, recv one and keep it,
 *                                  [step: close, release], "done", wait
 *
 * Exit status: 0 done; 1 usage; 2 a zcbuf call failed (status and message on stderr);
 * 3 a message held the wrong bytes.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "zcbuf.h"

#define ELEMS 8

static void fail(const char *what, int32_t st) {
    char msg[512];
    zcbuf_last_error(msg, sizeof msg);
    fprintf(stderr, "channel_step: %s gave %d (%s): %s\n", what, st, zcbuf_status_name(st), msg);
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

static void say(const char *s) {
    fputs(s, stdout);
    fputc('\n', stdout);
    fflush(stdout);
}

static void wait_stdin(void) {
    char c;
    while (read(0, &c, 1) == 1 && c != '\n') {
    }
}

static uint64_t publish(const char *name, uint32_t slots) {
    const uint64_t shape[1] = {ELEMS};
    uint64_t pub = 0;
    zcbuf_channel_t desc;
    CALL(zcbuf_publish(name, "<u8", 8, shape, 1, slots, ZCBUF_POLICY_BLOCK, 4, &pub, &desc));
    if (desc.msg_len != ELEMS * 8 || desc.slots != slots) {
        fprintf(stderr, "channel_step: description says %zu bytes, %u slots\n", desc.msg_len,
                desc.slots);
        exit(3);
    }
    return pub;
}

static void send_value(uint64_t pub, uint64_t v) {
    uint64_t msg[ELEMS];
    for (int i = 0; i < ELEMS; i++) {
        msg[i] = v;
    }
    uint64_t seq = 0;
    CALL(zcbuf_pub_send_copy(pub, (const uint8_t *)msg, sizeof msg, 5000000, &seq));
    if (seq != v) {
        fprintf(stderr, "channel_step: sent %llu as seq %llu\n", (unsigned long long)v,
                (unsigned long long)seq);
        exit(3);
    }
}

static void loan_send_value(uint64_t pub, uint64_t v) {
    uint8_t *p = NULL;
    uint32_t slot = 0;
    CALL(zcbuf_pub_loan(pub, 5000000, &p, &slot));
    for (int i = 0; i < ELEMS; i++) {
        memcpy(p + 8 * i, &v, 8);
    }
    CALL(zcbuf_pub_send(pub, slot, NULL));
}

static uint64_t subscribe(const char *name) {
    uint64_t sub = 0;
    zcbuf_channel_t desc;
    CALL(zcbuf_subscribe(name, &sub, &desc));
    if (desc.msg_len != ELEMS * 8 || desc.ndim != 1 || strcmp(desc.dtype, "<u8") != 0) {
        fprintf(stderr, "channel_step: not a channel of <u8 [8]: %zu bytes, %s\n", desc.msg_len,
                desc.dtype);
        exit(3);
    }
    return sub;
}

/* Receives one message (waiting up to 10 s), checks it holds one value, returns the value. */
static uint64_t recv_value(uint64_t sub, zcbuf_message_t *m) {
    CALL(zcbuf_sub_recv(sub, 10000000, m));
    uint64_t v;
    memcpy(&v, m->ptr, 8);
    for (int i = 1; i < ELEMS; i++) {
        uint64_t w;
        memcpy(&w, m->ptr + 8 * i, 8);
        if (w != v || m->len != ELEMS * 8) {
            fprintf(stderr, "channel_step: message %llu is torn\n", (unsigned long long)m->seq);
            exit(3);
        }
    }
    return v;
}

static void say_got(uint64_t v) {
    char line[64];
    snprintf(line, sizeof line, "got %llu", (unsigned long long)v);
    say(line);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: channel_step MODE NAME\n");
        return 1;
    }
    const char *mode = argv[1];
    const char *name = argv[2];
    zcbuf_message_t m;

    if (strcmp(mode, "pub_create") == 0) {
        marker();
        uint64_t pub = publish(name, 4);
        marker();
        say("ready");
        wait_stdin();
        for (uint64_t v = 0; v < 3; v++) {
            send_value(pub, v);
        }
        say("sent");
        wait_stdin();
        CALL(zcbuf_pub_close(pub));
        say("closed");
        wait_stdin();
        CALL(zcbuf_pub_free(pub));
    } else if (strcmp(mode, "send") == 0 || strcmp(mode, "loan_send") == 0 ||
               strcmp(mode, "pub_close") == 0) {
        uint64_t pub = publish(name, 8);
        say("ready");
        wait_stdin();
        for (uint64_t v = 0; v < 3; v++) {
            send_value(pub, v);
        }
        /* Let the other side receive 0..2 and fall asleep on the doorbell: the step then
         * rings it (a publisher makes no system call when nobody sleeps). */
        struct timespec pause = {0, 100 * 1000 * 1000};
        nanosleep(&pause, NULL);
        marker();
        if (strcmp(mode, "send") == 0) {
            send_value(pub, 3);
        } else if (strcmp(mode, "loan_send") == 0) {
            loan_send_value(pub, 3);
        } else {
            CALL(zcbuf_pub_close(pub));
        }
        marker();
        say("done");
        wait_stdin();
        if (strcmp(mode, "pub_close") != 0) {
            CALL(zcbuf_pub_close(pub));
            say("closed");
            wait_stdin();
        }
        CALL(zcbuf_pub_free(pub));
    } else if (strcmp(mode, "subscribe") == 0) {
        marker();
        uint64_t sub = subscribe(name);
        marker();
        say("ready");
        wait_stdin();
        uint64_t v = recv_value(sub, &m);
        CALL(zcbuf_sub_release(sub, m.slot));
        say_got(v);
        wait_stdin();
        CALL(zcbuf_sub_close(sub));
    } else if (strcmp(mode, "recv") == 0) {
        uint64_t sub = subscribe(name);
        say("ready");
        marker();
        uint64_t v = recv_value(sub, &m);
        CALL(zcbuf_sub_release(sub, m.slot));
        marker();
        say_got(v);
        wait_stdin();
        CALL(zcbuf_sub_close(sub));
    } else if (strcmp(mode, "sub_close") == 0) {
        uint64_t sub = subscribe(name);
        say("ready");
        wait_stdin();
        uint64_t v = recv_value(sub, &m);
        say_got(v);
        marker();
        CALL(zcbuf_sub_close(sub));
        CALL(zcbuf_sub_release(sub, m.slot));
        marker();
        say("done");
        wait_stdin();
    } else {
        fprintf(stderr, "channel_step: unknown mode %s\n", mode);
        return 1;
    }
    return 0;
}
