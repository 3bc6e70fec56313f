/*
 * list.h — private: one intrusive, circular, doubly linked list for every module (sessions,
 * buffers, jobs, connections, replies). An object embeds a list_node and is found again from
 * it with list_entry(); the list head is a bare list_node. No allocation, O(1) insert and
 * remove, and a removed node points at itself, so list_linked() tells whether it is in a list.
 *
 *     list_node jobs;                      list_init(&jobs);
 *     list_append(&jobs, &job->link);      list_remove(&job->link);
 *     list_for_each_entry(j, &jobs, my_job, link) { ... }
 *
 * Beside it, slist_append for the singly linked FIFOs kept as a head and a tail pointer, whose
 * whole chain is taken at once by the thread that consumes it (the CUDA launcher's tasks and
 * finished jobs, a fair-queue flow's jobs, the warm store's writer).
 */
#ifndef LA_COMMON_LIST_H
#define LA_COMMON_LIST_H

#include <stddef.h>

typedef struct list_node {
    struct list_node *prev, *next;
} list_node;

/* An empty list, or an unlinked node. */
static inline void list_init(list_node *n) { n->prev = n->next = n; }
static inline int list_empty(const list_node *head) { return head->next == head; }
/* A node (initialised with list_init) is in some list. */
static inline int list_linked(const list_node *n) { return n->next != n; }

/* Inserts n before pos (before the head: at the tail). */
static inline void list_insert_before(list_node *pos, list_node *n)
{
    n->prev = pos->prev;
    n->next = pos;
    pos->prev->next = n;
    pos->prev = n;
}
static inline void list_append(list_node *head, list_node *n) { list_insert_before(head, n); }
static inline void list_prepend(list_node *head, list_node *n)
{
    list_insert_before(head->next, n);
}

/* Unlinks n (a no-op on an unlinked node); n is unlinked afterwards. */
static inline void list_remove(list_node *n)
{
    n->prev->next = n->next;
    n->next->prev = n->prev;
    list_init(n);
}

/* Moves n to the tail of head's list (most recently used last). */
static inline void list_move_tail(list_node *head, list_node *n)
{
    list_remove(n);
    list_append(head, n);
}

/* Moves every node of src to the empty list dst; src is empty afterwards. */
static inline void list_take(list_node *dst, list_node *src)
{
    list_init(dst);
    if (list_empty(src))
        return;
    *dst = *src;
    dst->next->prev = dst;
    dst->prev->next = dst;
    list_init(src);
}

#define list_entry(node, type, member) ((type *)(void *)((char *)(node)-offsetof(type, member)))
/* The first entry, or NULL when the list is empty. */
#define list_first_entry(head, type, member) \
    (list_empty(head) ? NULL : list_entry((head)->next, type, member))

/* Iterates var (a type *) over the list; the body may remove var (the next one is kept). */
#define list_for_each_entry(var, head, type, member)                            \
    for (list_node *var##_n_ = (head)->next, *var##_t_ = var##_n_->next;        \
         var##_n_ != (head) && ((var) = list_entry(var##_n_, type, member), 1); \
         var##_n_ = var##_t_, var##_t_ = var##_n_->next)

/* Sets var (a type *) to the first entry of the list for which cond (an expression of var)
 * holds, or to NULL when none does: the lookups by id, uid or key. */
#define list_find_entry(var, head, type, member, cond)      \
    do {                                                    \
        type *list_f_;                                      \
        (var) = NULL;                                       \
        list_for_each_entry (list_f_, head, type, member) { \
            (var) = list_f_;                                \
            if (cond)                                       \
                break;                                      \
            (var) = NULL;                                   \
        }                                                   \
    } while (0)

/* Unlinks every entry of the list and hands it to release (free, or a destructor taking a
 * type *). */
#define list_drain(head, type, member, release)             \
    do {                                                    \
        type *list_d_;                                      \
        list_for_each_entry (list_d_, head, type, member) { \
            list_remove(&list_d_->member);                  \
            release(list_d_);                               \
        }                                                   \
    } while (0)

/* Appends item to the singly linked FIFO head..tail (both NULL when empty), linked through
 * item's member next. head and tail are lvalues, evaluated more than once. */
#define slist_append(head, tail, item, next) \
    do {                                     \
        (item)->next = NULL;                 \
        if (tail)                            \
            (tail)->next = (item);           \
        else                                 \
            (head) = (item);                 \
        (tail) = (item);                     \
    } while (0)

#endif /* LA_COMMON_LIST_H */
