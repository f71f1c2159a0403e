/* A C program using zcbuf: create a shared buffer, write through a lease, open it again by
 * name read-only, free while a lease is held, and show the errors bad input gets.
 * Build: gcc -Wall -Wextra -Werror -Iinclude examples/c_roundtrip.c -Ltarget/release -lzcbuf
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "zcbuf.h"

static int failures = 0;

#define CHECK(expr, want)                                                                     \
    do {                                                                                      \
        int32_t st_ = (expr);                                                                 \
        if (st_ != (want)) {                                                                  \
            char msg_[512];                                                                   \
            zcbuf_last_error(msg_, sizeof msg_);                                              \
            fprintf(stderr, "FAIL %s:%d: %s gave %d (%s), wanted %d: %s\n", __FILE__, __LINE__, \
                    #expr, st_, zcbuf_status_name(st_), (want), msg_);                       \
            failures++;                                                                       \
        }                                                                                     \
    } while (0)

int main(void) {
    uint64_t id = 0, ro = 0, bad = 0;
    uint8_t *p = NULL, *q = NULL;
    size_t n = 0, m = 0, name_len = 0;
    char name[256];

    /* create a 1 MiB shared buffer with a generated name */
    CHECK(zcbuf_create_shared(NULL, 1 << 20, &id), ZCBUF_OK);
    CHECK(zcbuf_name(id, name, sizeof name, &name_len), ZCBUF_OK);
    printf("created shared buffer id=%llu name=%s\n", (unsigned long long)id, name);

    /* it is listed as held, by this process only; gc leaves it alone */
    {
        size_t need = 0, removed = 0;
        CHECK(zcbuf_list(NULL, 0, &need), ZCBUF_OK);
        char *text = malloc(need + 1);
        if (!text) return 2;
        CHECK(zcbuf_list(text, need + 1, &need), ZCBUF_OK);
        char *line = strstr(text, name);
        /* fields: name, len, dtype, shape, held, holder pids, persistent, ... */
        char want[64];
        snprintf(want, sizeof want, "\t1048576\t\t\t1\t%ld\t0\t", (long)getpid());
        if (!line || !strstr(line, want)) {
            fprintf(stderr, "FAIL: zcbuf_list does not show %s held by this process only\n", name);
            failures++;
        }
        free(text);
        CHECK(zcbuf_gc(NULL, 0, NULL, &removed), ZCBUF_OK);
        CHECK(zcbuf_size(id, &n), ZCBUF_OK); /* still ours after gc */
    }

    /* write through a lease */
    CHECK(zcbuf_acquire(id, &p, &n), ZCBUF_OK);
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)(i * 7);

    /* open the same segment read-only: same bytes, no copy */
    CHECK(zcbuf_open_shared(name, ZCBUF_READ_ONLY, &ro), ZCBUF_OK);
    CHECK(zcbuf_acquire(ro, &q, &m), ZCBUF_OK);
    if (m != n || memcmp(p, q, n) != 0) {
        fprintf(stderr, "FAIL: the read-only view differs\n");
        failures++;
    }

    /* free while leases are held: the id retires, the memory stays */
    CHECK(zcbuf_free(id), ZCBUF_OK);
    CHECK(zcbuf_free(id), ZCBUF_ENOTFOUND);          /* double free */
    CHECK(zcbuf_acquire(id, &p, &n), ZCBUF_ENOTFOUND); /* acquire after free */
    if (p[12345] != (uint8_t)(12345 * 7)) {
        fprintf(stderr, "FAIL: data changed under a lease\n");
        failures++;
    }
    CHECK(zcbuf_release(id), ZCBUF_OK); /* last lease: unmapped now (the `ro` open still holds) */
    CHECK(zcbuf_release(id), ZCBUF_ENOTFOUND);
    CHECK(zcbuf_release(ro), ZCBUF_OK);
    CHECK(zcbuf_release(ro), ZCBUF_EINVAL); /* release without a lease */
    CHECK(zcbuf_free(ro), ZCBUF_OK);         /* last holder: the name goes */
    CHECK(zcbuf_open_shared(name, 0, &bad), ZCBUF_ENOTFOUND);

    /* bad input gets a status and a message, never a crash */
    CHECK(zcbuf_create(16, NULL), ZCBUF_EINVAL);
    CHECK(zcbuf_create((size_t)-1, &bad), ZCBUF_ENOMEM);
    CHECK(zcbuf_create_shared("a/b", 16, &bad), ZCBUF_EINVAL);
    CHECK(zcbuf_open_shared("zcbuf-does-not-exist", 0, &bad), ZCBUF_ENOTFOUND);
    CHECK(zcbuf_open_shared(NULL, 0, &bad), ZCBUF_EINVAL);
    {
        char junk[64];
        snprintf(junk, sizeof junk, "/tmp/zcbuf-c-junk-%ld", (long)getpid());
        FILE *f = fopen(junk, "w");
        if (!f) return 2;
        fputs("not a zcbuf file", f);
        fclose(f);
        CHECK(zcbuf_open_file(junk, ZCBUF_READ_ONLY, &bad), ZCBUF_ECORRUPT);
        char msg[512];
        size_t full = zcbuf_last_error(msg, sizeof msg);
        printf("a foreign file gives: %s (%zu bytes)\n", msg, full);
        char tiny[8];
        size_t again = zcbuf_last_error(tiny, sizeof tiny);
        if (again != full || strlen(tiny) != 7) {
            fprintf(stderr, "FAIL: truncation of the error message\n");
            failures++;
        }
        CHECK(zcbuf_create_file(junk, 16, &bad), ZCBUF_EEXIST); /* never overwrites */
        remove(junk);
    }

    /* a private zero-length buffer is valid */
    CHECK(zcbuf_create(0, &id), ZCBUF_OK);
    CHECK(zcbuf_acquire(id, &p, &n), ZCBUF_OK);
    if (n != 0 || p == NULL) {
        fprintf(stderr, "FAIL: zero-length buffer\n");
        failures++;
    }
    CHECK(zcbuf_release(id), ZCBUF_OK);
    CHECK(zcbuf_free(id), ZCBUF_OK);

    /* typed creation stores dtype and shape */
    {
        uint64_t shape[2] = {3, 4};
        zcbuf_info_t info;
        char dt[16];
        size_t dl = 0;
        uint64_t got[4];
        uint32_t nd = 0;
        CHECK(zcbuf_create_ex(ZCBUF_KIND_SHARED, NULL, 96, "<f8", 8, shape, 2, 0, &id), ZCBUF_OK);
        CHECK(zcbuf_info(id, &info), ZCBUF_OK);
        CHECK(zcbuf_dtype(id, dt, sizeof dt, &dl), ZCBUF_OK);
        CHECK(zcbuf_shape(id, got, 4, &nd), ZCBUF_OK);
        if (info.kind != ZCBUF_KIND_SHARED || info.len != 96 || strcmp(dt, "<f8") != 0 || nd != 2 ||
            got[0] != 3 || got[1] != 4) {
            fprintf(stderr, "FAIL: typed metadata\n");
            failures++;
        }
        CHECK(zcbuf_free(id), ZCBUF_OK);
        CHECK(zcbuf_create_ex(ZCBUF_KIND_PRIVATE, NULL, 95, "<f8", 8, shape, 2, 0, &id),
              ZCBUF_EINVAL);
    }

    if (failures) {
        fprintf(stderr, "%d failures\n", failures);
        return 1;
    }
    printf("c_roundtrip: all checks passed\n");
    return 0;
}
