/* A zcbuf call made while a thread is being torn down (from a pthread-key destructor, which glibc
 * runs after Rust's thread-locals are gone) must return its status, never abort the process. */
#include "zcbuf.h"
#include <pthread.h>
#include <stdio.h>

static pthread_key_t key;
static int status_in_destructor = -1;

static void destructor(void *p) {
    uint64_t id = (uint64_t)(uintptr_t)p;
    zcbuf_release(id);                             /* no lease: an error, recorded nowhere */
    status_in_destructor = zcbuf_free(id);         /* fine */
    char msg[64];
    (void)zcbuf_last_error(msg, sizeof msg);
}

static void *worker(void *x) {
    (void)x;
    uint64_t id;
    if (zcbuf_create(64, &id) != ZCBUF_OK) return NULL;
    zcbuf_release(id);                             /* an error first: the thread-local is in use */
    pthread_setspecific(key, (void *)(uintptr_t)id);
    return NULL;
}

int main(void) {
    pthread_key_create(&key, destructor);
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    pthread_join(t, NULL);
    printf("%d\n", status_in_destructor);
    return status_in_destructor == ZCBUF_OK ? 0 : 1;
}
