/*
 * strongroom._native -- guarded memory for secrets (Linux, CPython 3.11+).
 *
 * Python objects are a poor home for key material: the allocator moves and
 * frees them without wiping, the pages can be swapped or land in a core dump,
 * and nothing stops an overflow from reading or writing past the end.  A
 * GuardedBuffer is a mapping laid out like memguard's:
 *
 *   [guard page][canary slack ...... data][guard page]
 *    PROT_NONE   \__ inner pages, PROT_NONE  PROT_NONE
 *                    between uses
 *
 * The inner pages come from one of two places:
 *
 *  - memfd_secret(2) where the kernel has it and the RLIMIT_MEMLOCK budget
 *    allows: the pages leave the kernel's direct map, so not even the kernel
 *    (/proc/PID/mem, ptrace) can read them; they are locked and left out of
 *    core dumps by the kernel, and MADV_DONTFORK keeps them out of children
 *    (a shared mapping would otherwise be shared with the child, and
 *    MADV_WIPEONFORK does not apply to shared mappings);
 *  - otherwise a private anonymous mapping with mlock, MADV_DONTDUMP and
 *    MADV_WIPEONFORK (a forked child sees zeros).
 *
 * The data is pushed to the END of the inner pages so that running off its
 * end faults on the trailing guard page at once; the slack in front of it is
 * filled with a per-process random canary, so an underflow (or a stray write
 * into the slack) is caught when the buffer is closed.  Between operations
 * the inner pages are PROT_NONE, so a dangling pointer or an escaped view
 * crashes instead of reading the secret.  The Python side (core/memory.py)
 * decides when to open and close access; this file only provides mechanism.
 *
 * Not thread-safe on its own: every entry point runs under the GIL and
 * core/memory.py serialises mode changes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first: it defines _GNU_SOURCE, needed for explicit_bzero */

#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "auditline.h"
#include "keyops.h"

#ifndef SYS_memfd_secret
#define SYS_memfd_secret 447 /* same number on every architecture that has it; ENOSYS elsewhere */
#endif

#define CANARY_LEN 32                    /* power of two: slack[i] = canary[i % 32] */
#define MIN_SLACK 16                     /* at least this many canary bytes */
#define MAX_SIZE ((Py_ssize_t)64 << 20)  /* 64 MiB: secrets are small; refuse nonsense */

static unsigned char canary[CANARY_LEN]; /* generated once per process by getrandom(2) */
static size_t page_sz;
static pid_t self_pid;        /* getpid(), refreshed in forked children by after_fork_child */
static size_t locked_total;   /* bytes this module holds locked: mlocked + memfd_secret */
static size_t secret_total;   /* the memfd_secret part of locked_total */
static size_t mlock_fails;    /* how many times mlock failed, e.g. RLIMIT_MEMLOCK exhausted */
static int secretmem_state = -1; /* -1 not probed yet, 0 the kernel refuses it, 1 it works */
static int secretmem_on = 1;  /* 0: STRONGROOM_NO_SECRETMEM or set_secretmem(False) */
static PyObject *CanaryError;

typedef struct {
    PyObject_HEAD
    unsigned char *base;      /* whole mapping, leading guard page included; NULL once unmapped */
    size_t map_len;
    unsigned char *inner;     /* first inner page = first canary byte */
    size_t inner_len;
    unsigned char *data;      /* first data byte; data + size == end of the inner pages */
    Py_ssize_t size;
    Py_ssize_t exports;       /* live buffer-protocol views */
    pid_t owner;              /* process that created it: mlock and contents do not survive fork */
    int mode;                 /* 0 no access, 1 read-only, 2 read-write */
    int mlocked;              /* locked by mlock, or by the kernel (memfd_secret) */
    int secret;               /* inner pages are memfd_secret (absent in forked children) */
    int closed;               /* wiped; unmapped too unless views were still exported */
} GuardedBuffer;

static const int prot_of_mode[3] = {PROT_NONE, PROT_READ, PROT_READ | PROT_WRITE};

/* Constant time: an attacker timing close() or compare() learns nothing about where bytes differ. */
static int ct_equal(const unsigned char *a, const unsigned char *b, size_t n)
{
    volatile unsigned char acc = 0;
    for (size_t i = 0; i < n; i++)
        acc |= a[i] ^ b[i];
    return acc == 0;
}

static int canary_intact(const GuardedBuffer *self)
{
    size_t slack = (size_t)(self->data - self->inner);
    volatile unsigned char acc = 0;
    for (size_t i = 0; i < slack; i++)
        acc |= self->inner[i] ^ canary[i & (CANARY_LEN - 1)];
    return acc == 0;
}

/* The forked child gets zero pages (MADV_WIPEONFORK), no locks (mlock is not inherited) and
 * no secret pages at all (MADV_DONTFORK). */
static void after_fork_child(void)
{
    self_pid = getpid();
    locked_total = 0;
    secret_total = 0;
}

/* Secret pages exist only in the process that mapped them.  In a forked child their range
 * is a hole that a later mmap may fill with something else, so never touch it there. */
static int gb_pages_gone(const GuardedBuffer *self)
{
    return self->secret && self->owner != self_pid;
}

static void gb_unmap(GuardedBuffer *self)
{
    if (self->base == NULL)
        return;
    if (gb_pages_gone(self)) {
        munmap(self->base, page_sz); /* only the guard pages are ours here */
        munmap(self->inner + self->inner_len, page_sz);
    } else {
        if (self->mlocked && self->owner == self_pid) {
            if (!self->secret)
                munlock(self->inner, self->inner_len);
            else
                secret_total -= self->inner_len;
            locked_total -= self->inner_len;
        }
        munmap(self->base, self->map_len);
    }
    self->mlocked = 0;
    self->base = NULL;
}

/*
 * Shared by close() and dealloc, so it never raises: returns 0 if the canary
 * was damaged, 1 otherwise.  The canary is checked BEFORE wiping (the wipe
 * would destroy the evidence) but reported AFTER, so a damaged buffer is
 * still wiped and unmapped.  With views still exported the pages cannot be
 * unmapped under them: wipe, make them PROT_NONE (a late access crashes
 * rather than reading zeros as if they were a key) and let the release of
 * the last view unmap.
 */
static int gb_teardown(GuardedBuffer *self)
{
    int ok = 1;
    if (self->closed)
        return 1;
    self->closed = 1;
    self->mode = 0;
    if (self->base == NULL)
        return 1;
    if (gb_pages_gone(self)) {
        /* Nothing of ours to check or wipe: the secret never reached this process. */
    } else if (mprotect(self->inner, self->inner_len, PROT_READ | PROT_WRITE) == 0) {
        /* In a forked child the kernel already zeroed everything: no canary to check. */
        if (self->owner == self_pid)
            ok = canary_intact(self);
        explicit_bzero(self->inner, self->inner_len); /* cannot be optimised away */
    }
    if (self->exports > 0) {
        if (!gb_pages_gone(self))
            mprotect(self->inner, self->inner_len, PROT_NONE);
    } else {
        gb_unmap(self);
    }
    return ok;
}

/* CAP_IPC_LOCK in the effective set: the kernel then ignores RLIMIT_MEMLOCK. */
static int has_cap_ipc_lock(void)
{
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capget, &hdr, data) != 0)
        return 0;
    return (data[CAP_TO_INDEX(CAP_IPC_LOCK)].effective & CAP_TO_MASK(CAP_IPC_LOCK)) != 0;
}

/*
 * Secret memory is charged to RLIMIT_MEMLOCK, and a mapping past the limit may be accepted
 * and then die of SIGBUS on first touch, so decide before mapping, from our own count.
 * That is the count the kernel keeps unless something else in the process locks memory;
 * kernels that check at mmap time (6.18 does) then answer EAGAIN and we fall back.
 */
static int secret_budget_ok(size_t len)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_MEMLOCK, &rl) != 0)
        return 0;
    if (rl.rlim_cur == RLIM_INFINITY ||
        (locked_total <= rl.rlim_cur && len <= rl.rlim_cur - locked_total))
        return 1;
    return has_cap_ipc_lock();
}

static int secretmem_probe(void)
{
    if (secretmem_state < 0) {
        int fd = (int)syscall(SYS_memfd_secret, O_CLOEXEC);
        secretmem_state = fd >= 0;
        if (fd >= 0)
            close(fd);
    }
    return secretmem_state;
}

/*
 * Reserve guard + inner + guard as PROT_NONE, then map a memfd_secret file over the inner
 * part.  Returns the base, or NULL to say "use the anonymous path" (never raises).
 */
static unsigned char *map_secret(size_t map_len, size_t inner_len)
{
    int fd = (int)syscall(SYS_memfd_secret, O_CLOEXEC);
    if (fd < 0) {
        /* ENOSYS: no such syscall (or secretmem.enable=0); EINVAL/EPERM: refused, e.g. by
         * a seccomp filter.  None of these will change, so stop asking.  ENOMEM, EMFILE
         * and the like may pass, so only this buffer falls back. */
        if (errno == ENOSYS || errno == EINVAL || errno == EPERM)
            secretmem_state = 0;
        return NULL;
    }
    unsigned char *base = mmap(NULL, map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        close(fd);
        return NULL;
    }
    unsigned char *inner = base + page_sz;
    if (ftruncate(fd, (off_t)inner_len) != 0 ||
        mmap(inner, inner_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) ==
            MAP_FAILED ||
        /* Without it a child would SHARE the pages (and could write to them). */
        madvise(inner, inner_len, MADV_DONTFORK) != 0) {
        close(fd);
        munmap(base, map_len);
        return NULL;
    }
    close(fd); /* the mapping keeps the file alive */
    madvise(inner, inner_len, MADV_DONTDUMP); /* the kernel sets it already; say it anyway */
    /* Fault every page in now, so that whatever the kernel does about the budget it does
     * here, at allocation, not in the middle of an operation. */
    memset(inner, 0, inner_len);
    return base;
}

/* Private anonymous pages: mlock (best effort), DONTDUMP, WIPEONFORK.  NULL + errno on error. */
static unsigned char *map_anonymous(size_t map_len, size_t inner_len, int *mlocked)
{
    /* RW at first so mlock can fault the pages in; guards go PROT_NONE straight away. */
    unsigned char *base = mmap(NULL, map_len, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        return NULL;
    unsigned char *inner = base + page_sz;
    if (mprotect(base, page_sz, PROT_NONE) != 0 ||
        mprotect(inner + inner_len, page_sz, PROT_NONE) != 0) {
        int saved = errno;
        munmap(base, map_len);
        errno = saved;
        return NULL;
    }
    /* A full RLIMIT_MEMLOCK budget must not take the keystore down: carry on
     * unlocked, count it, and let the Python layer warn (once) about swap. */
    *mlocked = mlock(inner, inner_len) == 0;
    if (!*mlocked)
        mlock_fails++;
    /* Both are best effort: old kernels answer EINVAL and there is nothing better to do. */
    madvise(inner, inner_len, MADV_DONTDUMP);
#ifdef MADV_WIPEONFORK
    madvise(inner, inner_len, MADV_WIPEONFORK);
#endif
    return base;
}

static PyObject *gb_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"size", NULL};
    Py_ssize_t size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n:GuardedBuffer", kwlist, &size))
        return NULL;
    if (size <= 0 || size > MAX_SIZE) {
        PyErr_Format(PyExc_ValueError, "guarded buffer size must be 1..%zd bytes, not %zd",
                     MAX_SIZE, size);
        return NULL;
    }
    size_t inner_len = ((size_t)size + page_sz - 1) / page_sz * page_sz;
    if (inner_len - (size_t)size < MIN_SLACK)
        inner_len += page_sz;
    size_t map_len = inner_len + 2 * page_sz;

    GuardedBuffer *self = (GuardedBuffer *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    unsigned char *base = NULL;
    int secret = 0, mlocked = 0;
    if (secretmem_on && secretmem_probe() && secret_budget_ok(inner_len))
        base = map_secret(map_len, inner_len);
    if (base != NULL) {
        secret = mlocked = 1;
        locked_total += inner_len;
        secret_total += inner_len;
    } else {
        base = map_anonymous(map_len, inner_len, &mlocked);
        if (base == NULL) {
            PyErr_SetFromErrno(PyExc_OSError);
            Py_DECREF(self); /* nothing mapped: dealloc has nothing to undo */
            return NULL;
        }
        if (mlocked)
            locked_total += inner_len;
    }
    unsigned char *inner = base + page_sz;
    self->base = base;
    self->map_len = map_len;
    self->inner = inner;
    self->inner_len = inner_len;
    self->data = inner + inner_len - (size_t)size;
    self->size = size;
    self->owner = self_pid;
    self->mlocked = mlocked;
    self->secret = secret;

    /* The pages are zero; only the slack needs the canary. */
    for (size_t i = 0; inner + i < self->data; i++)
        inner[i] = canary[i & (CANARY_LEN - 1)];
    if (mprotect(inner, inner_len, PROT_NONE) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self); /* dealloc unmaps */
        return NULL;
    }
    return (PyObject *)self;
}

static void gb_dealloc(GuardedBuffer *self)
{
    static const char msg[] = "strongroom: guarded buffer canary damaged\n";
    if (!gb_teardown(self)) {
        /* fd 2 directly: no Python machinery (sys.stderr may be gone at exit), no secret. */
        if (write(STDERR_FILENO, msg, sizeof msg - 1) < 0) {
            /* nothing more we can do */
        }
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *gb_protect(GuardedBuffer *self, PyObject *arg)
{
    long mode = PyLong_AsLong(arg);
    if (mode == -1 && PyErr_Occurred())
        return NULL;
    if (mode < 0 || mode > 2)
        return PyErr_Format(PyExc_ValueError, "mode must be 0, 1 or 2, not %ld", mode);
    if (self->closed)
        return PyErr_Format(PyExc_ValueError, "guarded buffer is closed");
    if (gb_pages_gone(self)) {
        PyObject *exc = PyObject_CallFunction(
            PyExc_OSError, "is", ENOMEM,
            "guarded buffer pages are not mapped in this process "
            "(memfd_secret memory is not inherited by fork)");
        if (exc != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
        return NULL;
    }
    /* Allowed with views exported: the Python layer downgrades only when the remaining views
     * fit the new mode, and an escaped view hitting PROT_NONE crashes, which is the point. */
    if (mprotect(self->inner, self->inner_len, prot_of_mode[mode]) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    self->mode = (int)mode;
    Py_RETURN_NONE;
}

static PyObject *gb_close(GuardedBuffer *self, PyObject *Py_UNUSED(ignored))
{
    if (!gb_teardown(self)) {
        PyErr_SetString(CanaryError, "guarded buffer canary damaged");
        return NULL;
    }
    Py_RETURN_NONE;
}

static int gb_getbuffer(GuardedBuffer *self, Py_buffer *view, int flags)
{
    if (self->closed || self->mode == 0 || gb_pages_gone(self)) {
        PyErr_SetString(PyExc_BufferError,
                        self->closed         ? "guarded buffer is closed"
                        : self->mode == 0    ? "guarded buffer is not accessible"
                                             : "guarded buffer is not mapped in this process");
        view->obj = NULL;
        return -1;
    }
    if ((flags & PyBUF_WRITABLE) && self->mode != 2) {
        PyErr_SetString(PyExc_BufferError, "guarded buffer is read-only");
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->data, self->size, self->mode != 2,
                          flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void gb_releasebuffer(GuardedBuffer *self, Py_buffer *Py_UNUSED(view))
{
    if (--self->exports == 0 && self->closed)
        gb_unmap(self); /* deferred by a close() that found views still exported */
}

static PyObject *gb_get_size(GuardedBuffer *s, void *Py_UNUSED(c)) { return PyLong_FromSsize_t(s->size); }
static PyObject *gb_get_address(GuardedBuffer *s, void *Py_UNUSED(c)) { return PyLong_FromVoidPtr(s->data); }
static PyObject *gb_get_mode(GuardedBuffer *s, void *Py_UNUSED(c)) { return PyLong_FromLong(s->mode); }
static PyObject *gb_get_closed(GuardedBuffer *s, void *Py_UNUSED(c)) { return PyBool_FromLong(s->closed); }
static PyObject *gb_get_exports(GuardedBuffer *s, void *Py_UNUSED(c)) { return PyLong_FromSsize_t(s->exports); }
static PyObject *gb_get_mlocked(GuardedBuffer *s, void *Py_UNUSED(c))
{
    return PyBool_FromLong(s->mlocked && s->base != NULL && s->owner == self_pid);
}
static PyObject *gb_get_secret(GuardedBuffer *s, void *Py_UNUSED(c))
{
    return PyBool_FromLong(s->secret && s->base != NULL && s->owner == self_pid);
}

static PyGetSetDef gb_getset[] = {
    {"size", (getter)gb_get_size, NULL, "number of data bytes", NULL},
    {"address", (getter)gb_get_address, NULL, "address of the first data byte (for tests)", NULL},
    {"mode", (getter)gb_get_mode, NULL, "0 no access, 1 read-only, 2 read-write", NULL},
    {"closed", (getter)gb_get_closed, NULL, "wiped and released", NULL},
    {"mlocked", (getter)gb_get_mlocked, NULL, "inner pages are locked in RAM", NULL},
    {"secret", (getter)gb_get_secret, NULL,
     "inner pages are memfd_secret: out of the kernel's direct map", NULL},
    {"exports", (getter)gb_get_exports, NULL, "number of live buffer views", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef gb_methods[] = {
    {"protect", (PyCFunction)gb_protect, METH_O, "protect(mode): 0 none, 1 read, 2 read-write"},
    {"close", (PyCFunction)gb_close, METH_NOARGS, "check canary, wipe, unlock, unmap"},
    {NULL, NULL, 0, NULL},
};

static PyBufferProcs gb_as_buffer = {(getbufferproc)gb_getbuffer, (releasebufferproc)gb_releasebuffer};

static PyTypeObject GuardedBufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "strongroom._native.GuardedBuffer",
    .tp_doc = "GuardedBuffer(size): page-guarded, canaried, locked secret memory "
              "(memfd_secret where available)",
    .tp_basicsize = sizeof(GuardedBuffer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = gb_new,
    .tp_dealloc = (destructor)gb_dealloc,
    .tp_as_buffer = &gb_as_buffer,
    .tp_methods = gb_methods,
    .tp_getset = gb_getset,
};

/* ---- module functions ---------------------------------------------------------------- */

static PyObject *m_page_size(PyObject *m, PyObject *Py_UNUSED(a))
{
    (void)m;
    return PyLong_FromSize_t(page_sz);
}

static PyObject *m_memlock_limit(PyObject *m, PyObject *Py_UNUSED(a))
{
    struct rlimit rl;
    (void)m;
    if (getrlimit(RLIMIT_MEMLOCK, &rl) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return Py_BuildValue("(LL)", rl.rlim_cur == RLIM_INFINITY ? -1LL : (long long)rl.rlim_cur,
                         rl.rlim_max == RLIM_INFINITY ? -1LL : (long long)rl.rlim_max);
}

static PyObject *m_locked_bytes(PyObject *m, PyObject *Py_UNUSED(a))
{
    (void)m;
    return PyLong_FromSize_t(locked_total);
}

static PyObject *m_secret_bytes(PyObject *m, PyObject *Py_UNUSED(a))
{
    (void)m;
    return PyLong_FromSize_t(secret_total);
}

static PyObject *m_secretmem_available(PyObject *m, PyObject *Py_UNUSED(a))
{
    (void)m;
    return PyBool_FromLong(secretmem_probe());
}

static PyObject *m_secretmem_enabled(PyObject *m, PyObject *Py_UNUSED(a))
{
    (void)m;
    return PyBool_FromLong(secretmem_on);
}

static PyObject *m_set_secretmem(PyObject *m, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    (void)m;
    if (on < 0)
        return NULL;
    secretmem_on = on;
    Py_RETURN_NONE;
}

/* out[i] = a[i] ^ b[i]: combines key shards without the result passing through Python.
 * out may be a or b itself. */
static PyObject *m_xor_into(PyObject *m, PyObject *args)
{
    Py_buffer out, a, b;
    int same = 0;
    (void)m;
    if (!PyArg_ParseTuple(args, "w*y*y*:xor_into", &out, &a, &b))
        return NULL;
    same = out.len == a.len && out.len == b.len;
    if (same) {
        unsigned char *o = out.buf;
        const unsigned char *x = a.buf, *y = b.buf;
        for (Py_ssize_t i = 0; i < out.len; i++)
            o[i] = x[i] ^ y[i];
    } else {
        PyErr_Format(PyExc_ValueError,
                     "xor_into() needs buffers of equal length, not %zd, %zd and %zd",
                     out.len, a.len, b.len);
    }
    PyBuffer_Release(&out);
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    if (!same)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *m_mlock_failures(PyObject *m, PyObject *Py_UNUSED(a))
{
    (void)m;
    return PyLong_FromSize_t(mlock_fails);
}

/* Core files and ptrace-style readers (/proc/pid/mem) are the other ways secrets leave. */
static PyObject *m_disable_core_dumps(PyObject *m, PyObject *Py_UNUSED(a))
{
    struct rlimit zero = {0, 0};
    (void)m;
    if (setrlimit(RLIMIT_CORE, &zero) != 0 || prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/*
 * Zero a bytes or bytearray in place.  For bytes this deliberately breaks
 * immutability: it is only for a bytes object the caller owns exclusively
 * (e.g. a secret just returned by a decrypt call) and is about to drop, since
 * many C libraries hand secrets back only as bytes.  Lengths 0 and 1 are
 * shared singletons in CPython and are left alone.  The cached hash is reset
 * because it is a function of the old contents.
 */
static PyObject *m_scrub(PyObject *m, PyObject *obj)
{
    (void)m;
    if (PyBytes_Check(obj)) {
        Py_ssize_t n = PyBytes_GET_SIZE(obj);
        if (n > 1) {
            explicit_bzero(PyBytes_AS_STRING(obj), (size_t)n);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
            ((PyBytesObject *)obj)->ob_shash = -1;
#pragma GCC diagnostic pop
        }
    } else if (PyByteArray_Check(obj)) {
        /* The whole allocation, not just the current length: shrinking leaves old bytes behind. */
        PyByteArrayObject *ba = (PyByteArrayObject *)obj;
        if (ba->ob_bytes != NULL && ba->ob_alloc > 0)
            explicit_bzero(ba->ob_bytes, (size_t)ba->ob_alloc);
    } else {
        return PyErr_Format(PyExc_TypeError, "scrub() needs bytes or bytearray, not %.100s",
                            Py_TYPE(obj)->tp_name);
    }
    Py_RETURN_NONE;
}

static PyObject *m_wipe(PyObject *m, PyObject *args)
{
    Py_buffer view;
    (void)m;
    if (!PyArg_ParseTuple(args, "w*:wipe", &view))
        return NULL;
    explicit_bzero(view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *m_compare(PyObject *m, PyObject *args)
{
    Py_buffer a, b;
    int eq;
    (void)m;
    if (!PyArg_ParseTuple(args, "y*y*:compare", &a, &b))
        return NULL;
    eq = a.len == b.len && ct_equal(a.buf, b.buf, (size_t)a.len); /* length is not secret */
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return PyBool_FromLong(eq);
}

static PyMethodDef module_methods[] = {
    {"audit_append", m_audit_append, METH_VARARGS,
     "audit_append(fd, expected_size, seq, head, key, payload, tail, prev) -> "
     "(new_size, hash) | None: one audit record under flock (native/auditline.c)"},
    {"page_size", m_page_size, METH_NOARGS, "page_size() -> int"},
    {"memlock_limit", m_memlock_limit, METH_NOARGS,
     "memlock_limit() -> (soft, hard) RLIMIT_MEMLOCK in bytes, -1 = unlimited"},
    {"locked_bytes", m_locked_bytes, METH_NOARGS,
     "bytes of RLIMIT_MEMLOCK budget held by guarded buffers (mlocked + memfd_secret)"},
    {"secret_bytes", m_secret_bytes, METH_NOARGS,
     "the memfd_secret part of locked_bytes()"},
    {"secretmem_available", m_secretmem_available, METH_NOARGS,
     "secretmem_available() -> bool: the kernel offers memfd_secret (probed once)"},
    {"secretmem_enabled", m_secretmem_enabled, METH_NOARGS,
     "secretmem_enabled() -> bool: new buffers try memfd_secret (if available)"},
    {"set_secretmem", m_set_secretmem, METH_O,
     "set_secretmem(enabled): whether new buffers try memfd_secret"},
    {"xor_into", m_xor_into, METH_VARARGS,
     "xor_into(out, a, b): out[i] = a[i] ^ b[i], equal lengths"},
    {"mlock_failures", m_mlock_failures, METH_NOARGS, "number of failed mlock calls"},
    {"disable_core_dumps", m_disable_core_dumps, METH_NOARGS,
     "RLIMIT_CORE = 0 and PR_SET_DUMPABLE = 0; OSError on failure"},
    {"scrub", m_scrub, METH_O, "scrub(bytes | bytearray): zero its contents in place"},
    {"wipe", m_wipe, METH_VARARGS, "wipe(buffer): zero a writable buffer"},
    {"compare", m_compare, METH_VARARGS, "compare(a, b) -> bool, constant time"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, .m_name = "strongroom._native",
    .m_doc = "Guarded memory for secrets.", .m_size = -1, .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
    size_t got = 0;
    while (got < sizeof canary) { /* the canary must be unguessable, or an overflow can forge it */
        ssize_t n = getrandom(canary + got, sizeof canary - got, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        got += (size_t)n;
    }
    page_sz = (size_t)sysconf(_SC_PAGESIZE);
    self_pid = getpid();
    const char *no_secretmem = getenv("STRONGROOM_NO_SECRETMEM");
    secretmem_on = no_secretmem == NULL || no_secretmem[0] == '\0' ||
                   strcmp(no_secretmem, "0") == 0;
    if (pthread_atfork(NULL, NULL, after_fork_child) != 0)
        return PyErr_Format(PyExc_OSError, "pthread_atfork failed");
    if (PyType_Ready(&GuardedBufferType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL)
        return NULL;
    CanaryError = PyErr_NewExceptionWithDoc("strongroom._native.CanaryError",
                                            "A guarded buffer's canary was overwritten.",
                                            PyExc_RuntimeError, NULL);
    if (CanaryError == NULL || PyModule_AddObjectRef(m, "CanaryError", CanaryError) < 0 ||
        PyModule_AddObjectRef(m, "GuardedBuffer", (PyObject *)&GuardedBufferType) < 0 ||
        keyops_add_methods(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
