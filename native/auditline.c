/*
 * strongroom._native.audit_append -- the hot path of the audit log's file sink.
 *
 * core/audit.py keeps the design: every writer of a log (threads and processes) takes an
 * exclusive flock(2) on it, checks that the file still ends where this process's last
 * record ended (else the tail is re-read, in Python), appends one record with one
 * write(2) on an O_APPEND descriptor, and releases the lock.  This function does exactly
 * that in one call, so that the record costs its system calls and little else:
 *
 *   flock(LOCK_EX); size = lseek(SEEK_END);
 *   size != expected  ->  unlock, return None (the caller takes the slow path);
 *   line = {"seq":SEQ,"time":NOW,HEAD[,"input":"hmac-sha256:HMAC"]TAIL,"prev":"PREV"}
 *   write(line + "\n"); a failed or short write is cut back off (ftruncate to size);
 *   hash = SHA-256(line) in hex; unlock; return (size + written, hash)
 *
 * NOW is the wall clock when the lock is held, in seconds with six decimals (the layout
 * of Python's f"{time.time():.6f}", written from integers: no locale).  HEAD and TAIL are
 * JSON made by the caller (the fixed fields, the details).  HMAC is HMAC-SHA256 (RFC 2104)
 * of the payload under the log's key.  SHA-256 comes from OpenSSL's libcrypto.  The GIL
 * is held except while waiting for another process's lock and while hashing a large
 * payload (see below).  The line is built in memory this function owns; nothing secret
 * is in it (the payload appears only as its HMAC), so it is freed without wiping.  The
 * HMAC key's padded copies are wiped.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#include "auditline.h"

#define BLOCK 64
#define DIGEST 32
#define INPUT_OPEN ",\"input\":\"hmac-sha256:"
#define PREV_OPEN ",\"prev\":\""

static EVP_MD *sha256_md = NULL; /* fetched once, under the GIL */

static const char HEX[] = "0123456789abcdef";

static void to_hex(const unsigned char *in, size_t n, char *out)
{
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = HEX[in[i] >> 4];
        out[2 * i + 1] = HEX[in[i] & 15];
    }
}

/* SHA-256 of two pieces; 0 on success. */
static int sha256_2(EVP_MD_CTX *ctx, const void *a, size_t an, const void *b, size_t bn,
                    unsigned char out[DIGEST])
{
    unsigned int len = 0;
    if (EVP_DigestInit_ex2(ctx, sha256_md, NULL) != 1)
        return -1;
    if (an && EVP_DigestUpdate(ctx, a, an) != 1)
        return -1;
    if (bn && EVP_DigestUpdate(ctx, b, bn) != 1)
        return -1;
    if (EVP_DigestFinal_ex(ctx, out, &len) != 1 || len != DIGEST)
        return -1;
    return 0;
}

/* HMAC-SHA256 (RFC 2104); 0 on success. */
static int hmac_sha256(EVP_MD_CTX *ctx, const unsigned char *key, size_t keylen,
                       const unsigned char *msg, size_t msglen, unsigned char out[DIGEST])
{
    unsigned char k[BLOCK], pad[BLOCK], inner[DIGEST];
    int rc = -1;
    memset(k, 0, sizeof k);
    if (keylen > BLOCK) {
        if (sha256_2(ctx, key, keylen, NULL, 0, k) != 0)
            goto done;
    } else if (keylen) {
        memcpy(k, key, keylen);
    }
    for (int i = 0; i < BLOCK; i++)
        pad[i] = k[i] ^ 0x36;
    if (sha256_2(ctx, pad, BLOCK, msg, msglen, inner) != 0)
        goto done;
    for (int i = 0; i < BLOCK; i++)
        pad[i] = k[i] ^ 0x5c;
    if (sha256_2(ctx, pad, BLOCK, inner, DIGEST, out) != 0)
        goto done;
    rc = 0;
done:
    explicit_bzero(k, sizeof k);
    explicit_bzero(pad, sizeof pad);
    explicit_bzero(inner, sizeof inner);
    return rc;
}

PyObject *m_audit_append(PyObject *m, PyObject *args)
{
    (void)m;
    int fd;
    long long expected, seq;
    /* head, tail and prev are str: for ASCII text (all JSON here is ASCII-escaped) "s#"
       hands over the string's own bytes, with no copy. */
    Py_buffer key = {0}, payload = {0};
    const char *head_p, *tail_p, *prev_p;
    Py_ssize_t head_n, tail_n, prev_n;
    PyObject *payload_obj = Py_None, *result = NULL;
    if (!PyArg_ParseTuple(args, "iLLs#y*Os#s#:audit_append", &fd, &expected, &seq, &head_p,
                          &head_n, &key, &payload_obj, &tail_p, &tail_n, &prev_p, &prev_n))
        return NULL;
    int has_payload = payload_obj != Py_None;
    if (has_payload && PyObject_GetBuffer(payload_obj, &payload, PyBUF_SIMPLE) != 0)
        goto release;
    if (sha256_md == NULL) {
        sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
        if (sha256_md == NULL) {
            PyErr_SetString(PyExc_OSError, "OpenSSL has no SHA-256");
            goto release;
        }
    }

    size_t cap = 64 + (size_t)head_n + sizeof INPUT_OPEN + 2 * DIGEST + 2 + (size_t)tail_n +
                 sizeof PREV_OPEN + (size_t)prev_n + 4;
    /* One digest context for every call made with the GIL held (the GIL keeps them apart);
       the large-input HMAC, run without the GIL, makes and frees its own. */
    static EVP_MD_CTX *ctx = NULL;
    if (ctx == NULL && (ctx = EVP_MD_CTX_new()) == NULL) {
        PyErr_NoMemory();
        goto release;
    }
    char *line = PyMem_RawMalloc(cap);
    if (line == NULL) {
        PyErr_NoMemory();
        goto release;
    }

    int err = 0;               /* errno of a failed system call */
    int state = 0;             /* 0 ok, 1 size changed, 2 crypto failed, 3 short write */
    long long size = -1, new_size = -1;
    ssize_t written = 0;
    size_t n = 0;
    char hexhash[2 * DIGEST + 1];
    unsigned char digest[DIGEST];

    /* The GIL stays held for the common case (a few microseconds of system calls): letting
       it go here made two signing threads slower than one, each handing the GIL back and
       forth around every record. It is released where the wait can be long: for the
       HMAC of a large input, and while another process holds the log's lock. */
    if (has_payload && payload.len > (1 << 16)) {
        int bad = 1;
        Py_BEGIN_ALLOW_THREADS
        EVP_MD_CTX *own = EVP_MD_CTX_new();
        if (own != NULL) {
            bad = hmac_sha256(own, key.buf, (size_t)key.len, payload.buf, (size_t)payload.len,
                              digest);
            EVP_MD_CTX_free(own);
        }
        Py_END_ALLOW_THREADS
        if (bad)
            state = 2;
    } else if (has_payload &&
               hmac_sha256(ctx, key.buf, (size_t)key.len, payload.buf, (size_t)payload.len,
                           digest) != 0) {
        state = 2;
    }
    if (state == 0) {
        while (flock(fd, LOCK_EX | LOCK_NB) != 0) {
            if (errno == EINTR)
                continue;
            if (errno != EWOULDBLOCK) {
                err = errno;
                break;
            }
            /* Another process holds the lock: wait without the GIL. A signal interrupts
               the wait, and its Python handler runs (Ctrl-C, SIGTERM, an alarm); if the
               handler raises, nothing was written and the exception goes to the caller. */
            int rc, e = 0;
            Py_BEGIN_ALLOW_THREADS
            rc = flock(fd, LOCK_EX);
            if (rc != 0)
                e = errno;
            Py_END_ALLOW_THREADS
            if (rc == 0)
                break;
            if (e != EINTR) {
                err = e;
                break;
            }
            if (PyErr_CheckSignals() != 0) {
                PyMem_RawFree(line);
                goto release;
            }
        }
    }
    if (state == 0 && !err) {
        off_t end = lseek(fd, 0, SEEK_END);
        if (end < 0) {
            err = errno;
        } else if ((size = (long long)end) != expected) {
            state = 1;
        } else {
            /* The time in integers: printf's %f would take its decimal point from the
               locale, and a "1796284613,897574" is not JSON. */
            struct timespec now;
            clock_gettime(CLOCK_REALTIME, &now);
            long long secs = (long long)now.tv_sec;
            long micros = (now.tv_nsec + 500) / 1000;
            if (micros >= 1000000) {
                secs += 1;
                micros -= 1000000;
            }
            int lead = snprintf(line, 64, "{\"seq\":%lld,\"time\":%lld.%06ld,", seq, secs,
                                micros);
            if (lead < 0 || lead >= 64) { /* a clock or seq beyond any sane value */
                state = 2;
                flock(fd, LOCK_UN);
                goto unlocked;
            }
            n = (size_t)lead;
            memcpy(line + n, head_p, (size_t)head_n);
            n += (size_t)head_n;
            if (has_payload) {
                memcpy(line + n, INPUT_OPEN, sizeof INPUT_OPEN - 1);
                n += sizeof INPUT_OPEN - 1;
                to_hex(digest, DIGEST, line + n);
                n += 2 * DIGEST;
                line[n++] = '"';
            }
            memcpy(line + n, tail_p, (size_t)tail_n);
            n += (size_t)tail_n;
            memcpy(line + n, PREV_OPEN, sizeof PREV_OPEN - 1);
            n += sizeof PREV_OPEN - 1;
            memcpy(line + n, prev_p, (size_t)prev_n);
            n += (size_t)prev_n;
            line[n++] = '"';
            line[n++] = '}';
            line[n] = '\n';
            do {
                written = write(fd, line, n + 1);
            } while (written < 0 && errno == EINTR);
            if (written < 0) {
                err = errno;
            } else if ((size_t)written != n + 1) {
                state = 3;
            }
            if (err || state == 3) {
                if (ftruncate(fd, (off_t)size) != 0) {
                    /* the next writer (or verify) treats the stub as a torn line */
                }
            } else if (sha256_2(ctx, line, n, NULL, 0, digest) != 0) {
                state = 2; /* written; the caller re-reads the tail */
            } else {
                to_hex(digest, DIGEST, hexhash);
                hexhash[2 * DIGEST] = '\0';
                new_size = size + (long long)written;
            }
        }
        flock(fd, LOCK_UN); /* closing the descriptor releases it anyway */
    }
unlocked:

    PyMem_RawFree(line);
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    } else if (state == 1) {
        result = Py_NewRef(Py_None);
    } else if (state == 2) {
        PyErr_SetString(PyExc_OSError, "the audit record could not be formatted or hashed");
    } else if (state == 3) {
        PyErr_Format(PyExc_OSError,
                     "short write (%zd of %zu bytes; disk full or file size limit)", written,
                     n + 1);
    } else {
        result = Py_BuildValue("(Ls)", new_size, hexhash);
    }
release:
    PyBuffer_Release(&key);
    if (has_payload)
        PyBuffer_Release(&payload);
    return result;
}
