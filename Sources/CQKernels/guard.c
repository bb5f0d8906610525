// A SIGBUS guard for memory-mapped inputs. When another process truncates a file qconvert has
// mapped, touching a page past the new end raises SIGBUS. The handler below names the file whose
// mapping holds the faulting address, removes the temporary outputs in flight and exits 3, all
// with async-signal-safe calls only (the tables are fixed arrays of atomics, no locks, no malloc).
#include "CQKernels.h"
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define QK_GUARD_SLOTS 1024

typedef struct {
    _Atomic(uintptr_t) base;  // 0 = free
    _Atomic(size_t) length;
    _Atomic(char *) path;
} qk_mapping_slot;

static qk_mapping_slot mappings[QK_GUARD_SLOTS];
static _Atomic(char *) temps[QK_GUARD_SLOTS];
static int exit_code = 3;

static char *copy_string(const char *s) {
    size_t n = strlen(s);
    char *c = malloc(n + 1);
    if (c) memcpy(c, s, n + 1);
    return c;
}

void qk_guard_add_mapping(const void *base, size_t length, const char *path) {
    char *p = copy_string(path);
    if (!p) return;
    for (int i = 0; i < QK_GUARD_SLOTS; i++) {
        uintptr_t expected = 0;
        // claim the slot with a placeholder base first, then publish path, length and base
        if (atomic_compare_exchange_strong(&mappings[i].base, &expected, (uintptr_t)1)) {
            atomic_store(&mappings[i].path, p);
            atomic_store(&mappings[i].length, length);
            atomic_store(&mappings[i].base, (uintptr_t)base);
            return;
        }
    }
    free(p);  // table full: this mapping is not named on SIGBUS (the generic message is used)
}

void qk_guard_remove_mapping(const void *base) {
    for (int i = 0; i < QK_GUARD_SLOTS; i++) {
        if (atomic_load(&mappings[i].base) == (uintptr_t)base) {
            char *p = atomic_exchange(&mappings[i].path, NULL);
            atomic_store(&mappings[i].length, 0);
            atomic_store(&mappings[i].base, 0);
            free(p);
            return;
        }
    }
}

void qk_guard_add_temp(const char *path) {
    char *p = copy_string(path);
    if (!p) return;
    for (int i = 0; i < QK_GUARD_SLOTS; i++) {
        char *expected = NULL;
        if (atomic_compare_exchange_strong(&temps[i], &expected, p)) return;
    }
    free(p);
}

void qk_guard_remove_temp(const char *path) {
    for (int i = 0; i < QK_GUARD_SLOTS; i++) {
        char *p = atomic_load(&temps[i]);
        if (p && strcmp(p, path) == 0 && atomic_compare_exchange_strong(&temps[i], &p, NULL)) {
            free(p);
            return;
        }
    }
}

static void put(const char *s) {
    size_t n = strlen(s);
    while (n > 0) {
        ssize_t w = write(2, s, n);
        if (w <= 0) return;
        s += w;
        n -= (size_t)w;
    }
}

static atomic_int handling;

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    (void)sig;
    (void)context;
    /* several threads can fault on the same truncated file (the hash, the CRC check, the conversion):
       the first one reports and exits, the others wait for the exit */
    if (atomic_exchange(&handling, 1)) {
        for (;;) pause();
    }
    uintptr_t addr = (uintptr_t)info->si_addr;
    const char *path = NULL;
    for (int i = 0; i < QK_GUARD_SLOTS && !path; i++) {
        uintptr_t b = atomic_load(&mappings[i].base);
        size_t n = atomic_load(&mappings[i].length);
        if (b > 1 && addr >= b && addr - b < n) path = atomic_load(&mappings[i].path);
    }
    for (int i = 0; i < QK_GUARD_SLOTS; i++) {
        char *t = atomic_load(&temps[i]);
        if (t) unlink(t);
    }
    put("qconvert: error: ");
    if (path) {
        put(path);
        put(": ");
    }
    put("the file became shorter while it was being read (truncated or replaced by another process); no output written\n");
    _exit(exit_code);
}

void qk_guard_install(int code) {
    exit_code = code;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, NULL);
}

#include <fcntl.h>
#include <sys/syscall.h>
#include <errno.h>

int qk_rename_exchange(const char *from, const char *to) {
#ifdef SYS_renameat2
    return (int)syscall(SYS_renameat2, AT_FDCWD, from, AT_FDCWD, to, 2 /* RENAME_EXCHANGE */);
#else
    errno = ENOSYS;
    return -1;
#endif
}

#include <sys/prctl.h>

int qk_die_with_parent(int sig) {
    if (prctl(PR_SET_PDEATHSIG, sig) != 0) return -1;
    return getppid() == 1 ? 1 : 0;  // the parent is already gone
}
