/*
 * strongroom._native -- guarded memory for secrets (Linux, CPython 3.11+).
 *
 * Python objects are a poor home for key material: the allocator moves and
 * frees them without wiping, the pages can be swapped or land in a core dump,
 * and nothing stops an overflow from reading or writing past the end.  A
 * GuardedBuffer is a private mmap laid out like memguard's:
 *
 *   [guard page][canary slack ...... data][guard page]
 *    PROT_NONE   \__ inner pages: mlock, DONTDUMP,  PROT_NONE
 *                    WIPEONFORK, PROT_NONE between uses
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
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <unistd.h>

#define CANARY_LEN 32                    /* power of two: slack[i] = canary[i % 32] */
#define MIN_SLACK 16                     /* at least this many canary bytes */
#define MAX_SIZE ((Py_ssize_t)64 << 20)  /* 64 MiB: secrets are small; refuse nonsense */

static unsigned char canary[CANARY_LEN]; /* generated once per process by getrandom(2) */
static size_t page_sz;
static size_t locked_total;   /* bytes currently mlocked by this module (this process) */
static size_t mlock_fails;    /* how many times mlock failed, e.g. RLIMIT_MEMLOCK exhausted */
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
    int mlocked;
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

/* The forked child gets zero pages (MADV_WIPEONFORK) and no locks (mlock is not inherited). */
static void after_fork_child(void) { locked_total = 0; }

static void gb_unmap(GuardedBuffer *self)
{
    if (self->base == NULL)
        return;
    if (self->mlocked && self->owner == getpid()) {
        munlock(self->inner, self->inner_len);
        locked_total -= self->inner_len;
    }
    self->mlocked = 0;
    munmap(self->base, self->map_len);
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
    if (mprotect(self->inner, self->inner_len, PROT_READ | PROT_WRITE) == 0) {
        /* In a forked child the kernel already zeroed everything: no canary to check. */
        if (self->owner == getpid())
            ok = canary_intact(self);
        explicit_bzero(self->inner, self->inner_len); /* cannot be optimised away */
    }
    if (self->exports > 0)
        mprotect(self->inner, self->inner_len, PROT_NONE);
    else
        gb_unmap(self);
    return ok;
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

    /* RW at first so mlock can fault the pages in; guards go PROT_NONE straight away. */
    unsigned char *base = mmap(NULL, map_len, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        return PyErr_SetFromErrno(PyExc_OSError);
    unsigned char *inner = base + page_sz;
    if (mprotect(base, page_sz, PROT_NONE) != 0 ||
        mprotect(inner + inner_len, page_sz, PROT_NONE) != 0) {
        int saved = errno;
        munmap(base, map_len);
        errno = saved;
        return PyErr_SetFromErrno(PyExc_OSError);
    }

    GuardedBuffer *self = (GuardedBuffer *)type->tp_alloc(type, 0);
    if (self == NULL) {
        munmap(base, map_len);
        return NULL;
    }
    self->base = base;
    self->map_len = map_len;
    self->inner = inner;
    self->inner_len = inner_len;
    self->data = inner + inner_len - (size_t)size;
    self->size = size;
    self->owner = getpid();

    /* A full RLIMIT_MEMLOCK budget must not take the keystore down: carry on
     * unlocked, count it, and let the Python layer warn (once) about swap. */
    if (mlock(inner, inner_len) == 0) {
        self->mlocked = 1;
        locked_total += inner_len;
    } else {
        mlock_fails++;
    }
    /* Both are best effort: old kernels answer EINVAL and there is nothing better to do. */
    madvise(inner, inner_len, MADV_DONTDUMP);
#ifdef MADV_WIPEONFORK
    madvise(inner, inner_len, MADV_WIPEONFORK);
#endif
    /* mmap gave zeroed pages; only the slack needs the canary. */
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
    if (self->closed || self->mode == 0) {
        PyErr_SetString(PyExc_BufferError, self->closed ? "guarded buffer is closed"
                                                        : "guarded buffer is not accessible");
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
    return PyBool_FromLong(s->mlocked && s->base != NULL && s->owner == getpid());
}

static PyGetSetDef gb_getset[] = {
    {"size", (getter)gb_get_size, NULL, "number of data bytes", NULL},
    {"address", (getter)gb_get_address, NULL, "address of the first data byte (for tests)", NULL},
    {"mode", (getter)gb_get_mode, NULL, "0 no access, 1 read-only, 2 read-write", NULL},
    {"closed", (getter)gb_get_closed, NULL, "wiped and released", NULL},
    {"mlocked", (getter)gb_get_mlocked, NULL, "inner pages are locked in RAM", NULL},
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
    .tp_doc = "GuardedBuffer(size): page-guarded, canaried, mlocked secret memory",
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
    {"page_size", m_page_size, METH_NOARGS, "page_size() -> int"},
    {"memlock_limit", m_memlock_limit, METH_NOARGS,
     "memlock_limit() -> (soft, hard) RLIMIT_MEMLOCK in bytes, -1 = unlimited"},
    {"locked_bytes", m_locked_bytes, METH_NOARGS, "bytes currently mlocked by guarded buffers"},
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
        PyModule_AddObjectRef(m, "GuardedBuffer", (PyObject *)&GuardedBufferType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
