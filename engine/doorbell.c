/*
 * doorbell.c — the fast path's doorbells: one per connection, a sealed memfd of 16-byte slots
 * (backend.h be_doorbell_slot) that the client and the daemon both map. The client rings a
 * slot's ready word when a call's inputs are there; the daemon writes its status and done
 * words when the call is over. Nothing here waits: the backends wait (cuda: on the GPU, with
 * stream memory operations; cpu: the call fails when its slot was not rung before it was sent).
 *
 * Ownership: the client creates the memory and passes the fd; the daemon maps it. Host memory
 * rather than a CUDA allocation, so that the daemon can read the ready words and write the
 * done words from the host at any time (a call that fails before launch, a call released
 * because its client died or never rang), and the mapping stays valid whatever the client
 * does (it cannot free or shrink what the daemon maps: F_SEAL_SHRINK). A doorbell is
 * refcounted like a buffer: the connection holds one reference, every job naming it one more;
 * the cuda backend unregisters it from CUDA on its own thread before it is unmapped.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine_priv.h"

static void db_unmap(be_doorbell *bd)
{
    eng_doorbell *d = (eng_doorbell *)bd;
    if (bd->slots)
        munmap(bd->slots, bd->map_len);
    free(d);
}

void db_unref(eng *e, eng_doorbell *d)
{
    if (!d || --d->refs > 0)
        return;
    (void)e;
    if (d->cuda && d->cuda->ops->doorbell_release)
        d->cuda->ops->doorbell_release(d->cuda, &d->bd, db_unmap);
    else
        db_unmap(&d->bd);
}

eng_doorbell *db_get(eng *e, uint64_t conn_id)
{
    eng_doorbell *d;
    list_find_entry(d, &e->doorbells, eng_doorbell, link, d->conn_id == conn_id);
    return d;
}

uint64_t db_count(const eng *e)
{
    uint64_t n = 0;
    for (const list_node *p = e->doorbells.next; p != &e->doorbells; p = p->next)
        n++;
    return n;
}

void db_finish(be_doorbell *bd, uint32_t slot, uint32_t value, int status)
{
    be_doorbell_slot *s = &bd->slots[slot];
    atomic_store_explicit(&s->status, status, memory_order_relaxed);
    atomic_store_explicit(&s->done, value, memory_order_release);
}

void eng_doorbell_refuse(eng *e, uint64_t conn_id, uint32_t slot, uint32_t value, int code)
{
    eng_doorbell *d = db_get(e, conn_id);
    if (d && slot < d->bd.n_slots)
        db_finish(&d->bd, slot, value, code);
}

int eng_doorbell_add(eng *e, uint32_t uid, uint64_t conn_id, int fd, uint32_t slots, eng_error *err)
{
    int rc;
    if (fd < 0) {
        eng_errf(err, "conn %llu: doorbell without a file descriptor", (unsigned long long)conn_id);
        return LA_EINVAL;
    }
    uint32_t max = e->cfg.limits.max_doorbell_slots;
    if (e->shutting_down) {
        eng_errf(err, "the daemon is shutting down");
        rc = LA_ESHUTDOWN;
        goto fail;
    }
    if (db_get(e, conn_id)) {
        eng_errf(err, "conn %llu: this connection has a doorbell already (one per connection)",
                 (unsigned long long)conn_id);
        rc = LA_EEXIST;
        goto fail;
    }
    if (slots == 0 || (max && slots > max)) {
        eng_errf(err, "conn %llu: a doorbell of %u slots (1 to %u)", (unsigned long long)conn_id,
                 slots, max);
        rc = LA_EINVAL;
        goto fail;
    }
    /* Whole pages: CUDA pins (registers) whole pages, and a page past the file's end has
     * nothing to pin. */
    long page = sysconf(_SC_PAGESIZE);
    size_t pg = page > 0 ? (size_t)page : 4096;
    size_t need = ((size_t)slots * sizeof(be_doorbell_slot) + pg - 1) / pg * pg;
    struct stat st;
    int st_ok = fstat(fd, &st) == 0;
    if (!st_ok || !S_ISREG(st.st_mode) || st.st_size < 0 || (uint64_t)st.st_size < need) {
        eng_errf(err,
                 "conn %llu: a doorbell of %u slots needs a memfd of at least %zu bytes (whole "
                 "pages); its fd %s",
                 (unsigned long long)conn_id, slots, need,
                 !st_ok                 ? "cannot be examined"
                 : !S_ISREG(st.st_mode) ? "is not a regular file"
                                        : "holds fewer");
        rc = LA_EINVAL;
        goto fail;
    }
    /* As for shared-memory buffers: memory that could shrink under the mapping would turn the
     * daemon's accesses into SIGBUS. */
    int seals = fcntl(fd, F_GET_SEALS);
    if ((seals < 0 || !(seals & F_SEAL_SHRINK)) && fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
        eng_errf(err,
                 "conn %llu: the doorbell's fd cannot be sealed against shrinking "
                 "(F_SEAL_SHRINK): pass a memfd created with MFD_ALLOW_SEALING",
                 (unsigned long long)conn_id);
        rc = LA_EINVAL;
        goto fail;
    }
    size_t len = need;
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        eng_errf(err, "conn %llu: cannot map the doorbell: %s", (unsigned long long)conn_id,
                 strerror(errno));
        rc = errno == ENOMEM ? LA_ENOMEM : LA_EIO;
        goto fail;
    }
    close(fd);
    eng_doorbell *d = calloc(1, sizeof *d);
    if (!d) {
        munmap(p, len);
        eng_errf(err, "out of memory");
        return LA_ENOMEM;
    }
    d->bd.slots = p;
    d->bd.n_slots = slots;
    d->bd.map_len = len;
    atomic_init(&d->bd.cuda_state, 0);
    d->conn_id = conn_id;
    d->uid = uid;
    d->refs = 1;
    d->cuda = e->cuda;
    list_append(&e->doorbells, &d->link);
    e->n_doorbells++;
    return 0;
fail:
    close(fd);
    return rc;
}

void db_conn_closed(eng *e, uint64_t conn_id)
{
    eng_doorbell *d = db_get(e, conn_id);
    if (!d)
        return;
    list_remove(&d->link);
    db_unref(e, d);
}

void db_free_all(eng *e)
{
    while (!list_empty(&e->doorbells)) {
        eng_doorbell *d = list_first_entry(&e->doorbells, eng_doorbell, link);
        list_remove(&d->link);
        db_unref(e, d);
    }
}
