/*
 * users.h — private: the per-user records kept in a list (the engine's users, the warm store's,
 * the server's connection sums). Each record starts with a uid_node; uid_get finds it by uid
 * and makes it, zeroed, on first use.
 */
#ifndef LA_COMMON_USERS_H
#define LA_COMMON_USERS_H

#include <stdint.h>
#include <stdlib.h>

#include "list.h"

typedef struct uid_node {
    list_node link;
    uint32_t uid;
} uid_node;

/* The record of uid in head's list of records of size bytes (each starting with its uid_node),
 * or with create a new zeroed one appended when there is none. NULL: none, or out of memory. */
static inline void *uid_get(list_node *head, uint32_t uid, size_t size, int create)
{
    uid_node *n;
    list_find_entry(n, head, uid_node, link, n->uid == uid);
    if (n || !create)
        return n;
    n = calloc(1, size);
    if (!n)
        return NULL;
    n->uid = uid;
    list_append(head, &n->link);
    return n;
}

#endif /* LA_COMMON_USERS_H */
