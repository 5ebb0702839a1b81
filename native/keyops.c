/*
 * strongroom._native -- the vault's EC and RSA key operations on the system libcrypto.
 *
 * The vault keeps EC and RSA keys as PKCS#8 DER in guarded pages.  Loading them through a
 * general-purpose library leaves copies behind: DER decoders copy the key into ASN.1
 * strings and language-level buffers that are freed without being zeroed.  This file
 * keeps the key in three kinds of places only, each wiped when the operation ends:
 *
 *  - the caller's guarded page, read in place through the buffer protocol: DER is parsed
 *    here by a small strict reader (no d2i_*, no OSSL_DECODER) and the integers go
 *    straight from the page into BIGNUMs;
 *  - BIGNUMs made with BN_secure_new (BN_FLG_SECURE: cleansed on free, and allocated in
 *    OpenSSL's mlocked secure heap when it could be set up), inside EC_KEY/RSA objects
 *    whose free functions BN_clear_free every private component;
 *  - the C stack of the OpenSSL call (P-256's nistz256 code, the SHA-512 nonce hash and
 *    the Montgomery code keep scalars in stack arrays): every entry point runs its work
 *    in a separate frame and then overwrites the stack below it (scrub_stack).
 *
 * Secret outputs (generated or re-encoded keys, ECDH secrets) are written into a writable
 * buffer the caller passes (a guarded page); only public values, signatures and RSA
 * plaintexts come back as bytes.  The low-level EC_KEY/ECDSA/ECDH/RSA functions are
 * deprecated in OpenSSL 3.0 but present; they run in the calling process without the
 * provider layer's key export (which copies BIGNUMs through OSSL_PARAM buffers).
 *
 * Malformed input raises ValueError (the Python side maps it to InvalidArgument) and
 * never says anything about the key's bytes.
 */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_SUPPRESS_DEPRECATED /* EC_KEY and RSA, deliberately; this file only */
#include <Python.h>

#include <string.h>

#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/ecdsa.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/obj_mac.h>
#include <openssl/rsa.h>

#include "keyops.h"

/* -- stack scrubbing ------------------------------------------------------------------ */

#define STACK_SCRUB_BYTES (64 * 1024)

/*
 * Called from the frame that called into OpenSSL, so its array lies where the callee
 * frames were and overwrites what they left (64 KiB: far more than any of them uses).
 */
static __attribute__((noinline)) void scrub_stack(void)
{
    unsigned char area[STACK_SCRUB_BYTES];
    OPENSSL_cleanse(area, sizeof area);
    __asm__ __volatile__("" : : "r"(area) : "memory");
}

/* -- OpenSSL's secure heap ------------------------------------------------------------ */

#define SECURE_HEAP_BYTES (256 * 1024)
static int secure_heap_state = -1; /* -1 not tried; else CRYPTO_secure_malloc_init's result */

/* Under the GIL, before the first key operation (so importing the module costs nothing). */
static void secure_heap_init(void)
{
    if (secure_heap_state >= 0)
        return;
    if (CRYPTO_secure_malloc_initialized())
        secure_heap_state = 1;
    else
        /* 0 (no heap) still works: BN_FLG_SECURE BIGNUMs are cleansed when freed. */
        secure_heap_state = CRYPTO_secure_malloc_init(SECURE_HEAP_BYTES, 16);
    ERR_clear_error();
}

/* -- errors --------------------------------------------------------------------------- */

static PyObject *bad_key(const char *what)
{
    ERR_clear_error();
    PyErr_Format(PyExc_ValueError, "the key material is not a valid %s", what);
    return NULL;
}

static PyObject *ossl_failed(const char *what)
{
    ERR_clear_error();
    PyErr_Format(PyExc_RuntimeError, "OpenSSL failed to %s", what);
    return NULL;
}

/* -- a strict DER reader -------------------------------------------------------------- */

typedef struct {
    const unsigned char *p;
    size_t n;
} span;

/* Takes one element with single-byte `tag` off the front of `in`; its contents go to `out`. */
static int der_next(span *in, unsigned char tag, span *out)
{
    size_t len, head;
    if (in->n < 2 || in->p[0] != tag)
        return 0;
    if (in->p[1] < 0x80) {
        len = in->p[1];
        head = 2;
    } else {
        size_t k = in->p[1] & 0x7f;
        if (k == 0 || k > 3 || in->n < 2 + k || in->p[2] == 0)
            return 0;
        len = 0;
        for (size_t i = 0; i < k; i++)
            len = (len << 8) | in->p[2 + i];
        if (len < 0x80)
            return 0; /* DER: the short form was required */
        head = 2 + k;
    }
    if (len > in->n - head)
        return 0;
    out->p = in->p + head;
    out->n = len;
    in->p += head + len;
    in->n -= head + len;
    return 1;
}

static int der_peek(const span *in, unsigned char tag) { return in->n > 0 && in->p[0] == tag; }

/* A non-negative, minimally encoded INTEGER; `mag` is its magnitude without a 00 prefix. */
static int der_uint(span *in, span *mag)
{
    span v;
    if (!der_next(in, 0x02, &v) || v.n == 0 || (v.p[0] & 0x80))
        return 0;
    if (v.n > 1 && v.p[0] == 0 && !(v.p[1] & 0x80))
        return 0;
    if (v.n > 1 && v.p[0] == 0) {
        v.p++;
        v.n--;
    }
    *mag = v;
    return 1;
}

static int der_small(span *in, unsigned char value)
{
    span m;
    return der_uint(in, &m) && m.n == 1 && m.p[0] == value;
}

static int span_is(span s, const unsigned char *b, size_t n)
{
    return s.n == n && memcmp(s.p, b, n) == 0;
}

static const unsigned char OID_EC_PUBLIC_KEY[] = {0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01};
static const unsigned char OID_RSA[] = {0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01};
static const unsigned char OID_ED25519[] = {0x2b, 0x65, 0x70};
static const unsigned char OID_X25519[] = {0x2b, 0x65, 0x6e};

enum { ALG_EC, ALG_RSA, ALG_ED25519, ALG_X25519 };

typedef struct {
    int alg;
    span params; /* the curve OID for EC (may be empty) */
    span key;    /* contents of the privateKey OCTET STRING */
} pkcs8_info;

/* RFC 5208 PrivateKeyInfo or RFC 5958 OneAsymmetricKey, unencrypted. */
static int parse_pkcs8(span in, pkcs8_info *out)
{
    span seq, version, alg, oid, skip;
    if (!der_next(&in, 0x30, &seq) || in.n != 0 || !der_uint(&seq, &version))
        return 0;
    if (version.n != 1 || version.p[0] > 1) /* v1 (RFC 5208) or v2 (RFC 5958) */
        return 0;
    if (!der_next(&seq, 0x30, &alg) || !der_next(&alg, 0x06, &oid))
        return 0;
    out->params.p = NULL;
    out->params.n = 0;
    if (span_is(oid, OID_EC_PUBLIC_KEY, sizeof OID_EC_PUBLIC_KEY)) {
        out->alg = ALG_EC;
        if (alg.n > 0 && !der_next(&alg, 0x06, &out->params))
            return 0;
    } else if (span_is(oid, OID_RSA, sizeof OID_RSA)) {
        out->alg = ALG_RSA;
        if (alg.n > 0 && (!der_next(&alg, 0x05, &skip) || skip.n != 0))
            return 0;
    } else if (span_is(oid, OID_ED25519, sizeof OID_ED25519)) {
        out->alg = ALG_ED25519;
    } else if (span_is(oid, OID_X25519, sizeof OID_X25519)) {
        out->alg = ALG_X25519;
    } else {
        return 0;
    }
    if (alg.n != 0 || !der_next(&seq, 0x04, &out->key))
        return 0;
    if (der_peek(&seq, 0xa0) && !der_next(&seq, 0xa0, &skip)) /* attributes */
        return 0;
    if (version.p[0] == 1 && der_peek(&seq, 0x81) && !der_next(&seq, 0x81, &skip)) /* publicKey */
        return 0;
    return seq.n == 0;
}

/* RFC 5915 ECPrivateKey (SEC1). `curve` and `point` are empty when absent. */
static int parse_ec_private(span in, span *d, span *curve, span *point)
{
    span seq, tagged, bits;
    curve->n = point->n = 0;
    curve->p = point->p = NULL;
    if (!der_next(&in, 0x30, &seq) || in.n != 0 || !der_small(&seq, 1))
        return 0;
    if (!der_next(&seq, 0x04, d))
        return 0;
    if (der_peek(&seq, 0xa0)) {
        if (!der_next(&seq, 0xa0, &tagged) || !der_next(&tagged, 0x06, curve) || tagged.n)
            return 0;
    }
    if (der_peek(&seq, 0xa1)) {
        if (!der_next(&seq, 0xa1, &tagged) || !der_next(&tagged, 0x03, &bits) || tagged.n)
            return 0;
        if (bits.n < 2 || bits.p[0] != 0) /* no unused bits in a point */
            return 0;
        point->p = bits.p + 1;
        point->n = bits.n - 1;
    }
    return seq.n == 0;
}

typedef struct {
    span n, e, d, p, q, dp, dq, qi;
} rsa_parts;

/* RFC 8017 RSAPrivateKey, two primes only (version 0). */
static int parse_rsa_private(span in, rsa_parts *r)
{
    span seq;
    if (!der_next(&in, 0x30, &seq) || in.n != 0 || !der_small(&seq, 0))
        return 0;
    span *fields[] = {&r->n, &r->e, &r->d, &r->p, &r->q, &r->dp, &r->dq, &r->qi};
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
        if (!der_uint(&seq, fields[i]))
            return 0;
    return seq.n == 0;
}

/* -- a DER writer (sizes are computed first, so writes never overflow) ---------------- */

typedef struct {
    unsigned char *p;
} writer;

static size_t head_len(size_t n) { return n < 0x80 ? 2 : n < 0x100 ? 3 : n < 0x10000 ? 4 : 5; }

static void put_head(writer *w, unsigned char tag, size_t n)
{
    *w->p++ = tag;
    if (n < 0x80) {
        *w->p++ = (unsigned char)n;
        return;
    }
    size_t k = n < 0x100 ? 1 : n < 0x10000 ? 2 : 3;
    *w->p++ = (unsigned char)(0x80 | k);
    while (k--)
        *w->p++ = (unsigned char)(n >> (8 * k));
}

static void put(writer *w, const void *b, size_t n)
{
    memcpy(w->p, b, n);
    w->p += n;
}

/* Content length of a BIGNUM as a DER INTEGER (00 prefix when its top bit is set). */
static size_t int_len(const BIGNUM *bn)
{
    size_t n = (size_t)BN_num_bytes(bn);
    return n == 0 ? 1 : n + (BN_num_bits(bn) % 8 == 0);
}

static void put_int(writer *w, const BIGNUM *bn)
{
    size_t n = int_len(bn);
    put_head(w, 0x02, n);
    if ((size_t)BN_num_bytes(bn) < n)
        *w->p++ = 0;
    BN_bn2bin(bn, w->p); /* straight into the caller's buffer */
    w->p += (size_t)BN_num_bytes(bn);
}

/* -- curves --------------------------------------------------------------------------- */

typedef struct {
    int nid;
    size_t size; /* bytes of a scalar and of a field element */
    unsigned char oid[8];
    size_t oid_len;
    const char *name;
} curve_info;

static const curve_info CURVES[] = {
    {NID_X9_62_prime256v1, 32, {0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}, 8,
     "ECDSA P-256 private key"},
    {NID_secp384r1, 48, {0x2b, 0x81, 0x04, 0x00, 0x22}, 5, "ECDSA P-384 private key"},
    {NID_secp256k1, 32, {0x2b, 0x81, 0x04, 0x00, 0x0a}, 5, "secp256k1 private key"},
};
#define N_CURVES (sizeof CURVES / sizeof CURVES[0])

static const curve_info *curve_arg(int index)
{
    if (index < 0 || (size_t)index >= N_CURVES) {
        PyErr_SetString(PyExc_ValueError, "unknown curve index");
        return NULL;
    }
    return &CURVES[index];
}

/* PKCS#8 size for a curve: RFC 5208 around RFC 5915 with the uncompressed public point. */
static size_t ec_pkcs8_len(const curve_info *c)
{
    size_t bits = 2 + 2 * c->size;                 /* 00 || 04 || x || y */
    size_t tagged = head_len(bits) + bits;         /* [1] { BIT STRING } */
    size_t inner = 3 + 2 + c->size + head_len(tagged) + tagged;
    size_t octets = head_len(inner) + inner;
    size_t alg = 2 + sizeof OID_EC_PUBLIC_KEY + 2 + c->oid_len;
    size_t body = 3 + head_len(alg) + alg + head_len(octets) + octets;
    return head_len(body) + body;
}

/* The layout _ec_pkcs8 and OpenSSL's PKCS#8 encoder produce, so stored records match. */
static void ec_write_pkcs8(const curve_info *c, const BIGNUM *d, const unsigned char *point,
                           unsigned char *out)
{
    size_t bits = 2 + 2 * c->size, tagged = head_len(bits) + bits;
    size_t inner = 3 + 2 + c->size + head_len(tagged) + tagged;
    size_t octets = head_len(inner) + inner;
    size_t alg = 2 + sizeof OID_EC_PUBLIC_KEY + 2 + c->oid_len;
    size_t body = 3 + head_len(alg) + alg + head_len(octets) + octets;
    writer w = {out};
    put_head(&w, 0x30, body);
    put(&w, "\x02\x01\x00", 3);
    put_head(&w, 0x30, alg);
    put_head(&w, 0x06, sizeof OID_EC_PUBLIC_KEY);
    put(&w, OID_EC_PUBLIC_KEY, sizeof OID_EC_PUBLIC_KEY);
    put_head(&w, 0x06, c->oid_len);
    put(&w, c->oid, c->oid_len);
    put_head(&w, 0x04, octets);
    put_head(&w, 0x30, inner);
    put(&w, "\x02\x01\x01", 3);
    put_head(&w, 0x04, c->size);
    BN_bn2binpad(d, w.p, (int)c->size);
    w.p += c->size;
    put_head(&w, 0xa1, tagged);
    put_head(&w, 0x03, bits);
    *w.p++ = 0;
    put(&w, point, 1 + 2 * c->size);
}

/* The scalar and the optional public point of an EC key in PKCS#8 or SEC1 DER. */
static int ec_parts(const curve_info *c, span der, span *d, span *point)
{
    pkcs8_info info;
    span curve;
    if (parse_pkcs8(der, &info)) {
        if (info.alg != ALG_EC || !parse_ec_private(info.key, d, &curve, point))
            return 0;
        if (info.params.n == 0 && curve.n == 0)
            return 0; /* PKCS#8 must name its curve somewhere */
        if (info.params.n != 0 && !span_is(info.params, c->oid, c->oid_len))
            return 0;
    } else if (!parse_ec_private(der, d, &curve, point)) {
        return 0;
    }
    if (curve.n != 0 && !span_is(curve, c->oid, c->oid_len))
        return 0;
    return d->n > 0 && d->n <= c->size;
}

static BIGNUM *secure_bn(span s)
{
    BIGNUM *bn = BN_secure_new();
    if (bn != NULL && BN_bin2bn(s.p, (int)s.n, bn) == NULL) {
        BN_clear_free(bn);
        bn = NULL;
    }
    return bn;
}

/* One group per curve, built once under the GIL: building it is most of a P-256 sign's
   fixed cost, and an EC_GROUP is read-only once built (EC_KEY_set_group copies it). */
static EC_GROUP *curve_groups[3];

static int curve_groups_init(void)
{
    for (size_t i = 0; i < N_CURVES; i++)
        if (curve_groups[i] == NULL &&
            (curve_groups[i] = EC_GROUP_new_by_curve_name(CURVES[i].nid)) == NULL)
            return 0;
    return 1;
}

/* An EC_KEY with only the private scalar (signing and ECDH need no public point). */
static EC_KEY *ec_key_of(const curve_info *c, span d)
{
    EC_KEY *key = EC_KEY_new();
    if (key != NULL && EC_KEY_set_group(key, curve_groups[c - CURVES]) != 1) {
        EC_KEY_free(key);
        key = NULL;
    }
    BIGNUM *bn = secure_bn(d);
    int ok = key != NULL && bn != NULL && EC_KEY_set_private_key(key, bn) == 1;
    BN_clear_free(bn); /* EC_KEY_set_private_key keeps a BN_dup, which stays secure */
    if (!ok) {
        EC_KEY_free(key);
        return NULL;
    }
    return key;
}

/* -- buffer arguments ----------------------------------------------------------------- */

static span span_of(const Py_buffer *b)
{
    span s = {(const unsigned char *)b->buf, (size_t)b->len};
    return s;
}

/* The curve of a stored key, its scalar and point found in `material` (PKCS#8 in guarded
   memory), with the secure heap and the curve groups ready; NULL with a Python error set
   when any of that fails. */
static const curve_info *ec_stored_key(int index, const Py_buffer *material, span *d, span *point)
{
    const curve_info *c = curve_arg(index);
    if (c == NULL)
        return NULL;
    secure_heap_init();
    if (!curve_groups_init()) {
        ossl_failed("load an EC group");
        return NULL;
    }
    if (!ec_parts(c, span_of(material), d, point)) {
        bad_key(c->name);
        return NULL;
    }
    return c;
}

/* -- EC entry points ------------------------------------------------------------------ */

static PyObject *ec_pkcs8_size_impl(PyObject *args)
{
    int index;
    if (!PyArg_ParseTuple(args, "i:ec_pkcs8_size", &index))
        return NULL;
    const curve_info *c = curve_arg(index);
    return c == NULL ? NULL : PyLong_FromSize_t(ec_pkcs8_len(c));
}

/*
 * Validates scalar `d` (1 <= d < n), computes its public point, checks it against
 * `embedded` when one was given, writes PKCS#8 into `out` and returns the point.
 */
static PyObject *ec_finish(const curve_info *c, span d, span embedded, Py_buffer *out)
{
    PyObject *result = NULL;
    unsigned char point[1 + 2 * 66];
    size_t point_len = 1 + 2 * c->size;
    EC_GROUP *group = EC_GROUP_new_by_curve_name(c->nid);
    BN_CTX *ctx = BN_CTX_secure_new();
    BIGNUM *bn = secure_bn(d);
    EC_POINT *q = group ? EC_POINT_new(group) : NULL;
    EC_POINT *given = group ? EC_POINT_new(group) : NULL;
    if (group == NULL || ctx == NULL || bn == NULL || q == NULL || given == NULL) {
        ossl_failed("load an EC key");
        goto done;
    }
    if (BN_is_zero(bn) || BN_cmp(bn, EC_GROUP_get0_order(group)) >= 0) {
        bad_key(c->name);
        goto done;
    }
    if (!EC_POINT_mul(group, q, bn, NULL, NULL, ctx) ||
        EC_POINT_point2oct(group, q, POINT_CONVERSION_UNCOMPRESSED, point, point_len, ctx) !=
            point_len) {
        ossl_failed("compute an EC public key");
        goto done;
    }
    if (embedded.n != 0 &&
        (!EC_POINT_oct2point(group, given, embedded.p, embedded.n, ctx) ||
         EC_POINT_cmp(group, q, given, ctx) != 0)) {
        bad_key(c->name); /* the embedded public key does not belong to this scalar */
        goto done;
    }
    if ((size_t)out->len != ec_pkcs8_len(c)) {
        PyErr_SetString(PyExc_ValueError, "output buffer has the wrong size");
        goto done;
    }
    ec_write_pkcs8(c, bn, point, out->buf);
    result = PyBytes_FromStringAndSize((const char *)point, (Py_ssize_t)point_len);
done:
    EC_POINT_free(given);
    EC_POINT_free(q);
    BN_clear_free(bn);
    BN_CTX_free(ctx);
    EC_GROUP_free(group);
    return result;
}

static PyObject *ec_import_impl(PyObject *args)
{
    int index, raw;
    Py_buffer data, out;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "iy*pw*:ec_import", &index, &data, &raw, &out))
        return NULL;
    const curve_info *c = curve_arg(index);
    span d, point = {NULL, 0};
    if (c == NULL)
        goto done;
    secure_heap_init();
    if (raw) {
        d = span_of(&data);
        if (d.n != c->size) {
            bad_key(c->name);
            goto done;
        }
    } else if (!ec_parts(c, span_of(&data), &d, &point)) {
        bad_key(c->name);
        goto done;
    }
    result = ec_finish(c, d, point, &out);
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *ec_generate_impl(PyObject *args)
{
    int index, ok;
    Py_buffer out;
    PyObject *result = NULL;
    EC_KEY *key = NULL;
    unsigned char point[1 + 2 * 66];
    if (!PyArg_ParseTuple(args, "iw*:ec_generate", &index, &out))
        return NULL;
    const curve_info *c = curve_arg(index);
    if (c == NULL)
        goto done;
    if ((size_t)out.len != ec_pkcs8_len(c)) {
        PyErr_SetString(PyExc_ValueError, "output buffer has the wrong size");
        goto done;
    }
    secure_heap_init();
    key = EC_KEY_new_by_curve_name(c->nid);
    if (key == NULL) {
        ossl_failed("generate an EC key");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    ok = EC_KEY_generate_key(key) == 1 && /* priv_key is BN_secure_new'd */
         EC_POINT_point2oct(EC_KEY_get0_group(key), EC_KEY_get0_public_key(key),
                            POINT_CONVERSION_UNCOMPRESSED, point, 1 + 2 * c->size,
                            NULL) == 1 + 2 * c->size;
    if (ok)
        ec_write_pkcs8(c, EC_KEY_get0_private_key(key), point, out.buf);
    Py_END_ALLOW_THREADS
    if (!ok) {
        ossl_failed("generate an EC key");
        goto done;
    }
    result = PyBytes_FromStringAndSize((const char *)point, (Py_ssize_t)(1 + 2 * c->size));
done:
    EC_KEY_free(key);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *ec_sign_impl(PyObject *args)
{
    int index;
    Py_buffer material, digest;
    PyObject *result = NULL;
    EC_KEY *key = NULL;
    ECDSA_SIG *sig = NULL;
    unsigned char *der = NULL;
    span d, point;
    if (!PyArg_ParseTuple(args, "iy*y*:ec_sign", &index, &material, &digest))
        return NULL;
    if (digest.len < 20 || digest.len > 64) {
        PyErr_SetString(PyExc_ValueError, "an ECDSA digest is 20 to 64 bytes");
        goto done;
    }
    const curve_info *c = ec_stored_key(index, &material, &d, &point);
    if (c == NULL)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    key = ec_key_of(c, d);
    if (key != NULL)
        sig = ECDSA_do_sign(digest.buf, (int)digest.len, key);
    EC_KEY_free(key);
    Py_END_ALLOW_THREADS
    key = NULL;
    int len = sig == NULL ? -1 : i2d_ECDSA_SIG(sig, &der);
    if (len <= 0) {
        ossl_failed("sign with an EC key");
        goto done;
    }
    result = PyBytes_FromStringAndSize((const char *)der, len);
done:
    OPENSSL_free(der);
    ECDSA_SIG_free(sig);
    PyBuffer_Release(&digest);
    PyBuffer_Release(&material);
    return result;
}

static PyObject *ec_ecdh_impl(PyObject *args)
{
    int index, n = -1;
    Py_buffer material, peer, out;
    PyObject *result = NULL;
    EC_KEY *key = NULL;
    EC_POINT *pub = NULL;
    span d, point;
    if (!PyArg_ParseTuple(args, "iy*y*w*:ec_ecdh", &index, &material, &peer, &out))
        return NULL;
    const curve_info *c = ec_stored_key(index, &material, &d, &point);
    if (c == NULL)
        goto done;
    if ((size_t)out.len != c->size) {
        PyErr_SetString(PyExc_ValueError, "output buffer has the wrong size");
        goto done;
    }
    key = ec_key_of(c, d);
    if (key == NULL) {
        ossl_failed("load an EC key");
        goto done;
    }
    pub = EC_POINT_new(EC_KEY_get0_group(key));
    if (pub == NULL || !EC_POINT_oct2point(EC_KEY_get0_group(key), pub, peer.buf,
                                           (size_t)peer.len, NULL)) {
        ERR_clear_error();
        PyErr_SetString(PyExc_ValueError, "the peer's public key is not a point on the curve");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    n = ECDH_compute_key(out.buf, (size_t)out.len, pub, key, NULL);
    Py_END_ALLOW_THREADS
    if (n != (int)c->size) {
        OPENSSL_cleanse(out.buf, (size_t)out.len);
        ossl_failed("compute an ECDH shared secret");
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    EC_POINT_free(pub);
    EC_KEY_free(key);
    PyBuffer_Release(&out);
    PyBuffer_Release(&peer);
    PyBuffer_Release(&material);
    return result;
}

static PyObject *ec_scalar_impl(PyObject *args)
{
    int index;
    Py_buffer material;
    PyObject *result = NULL;
    span d, point;
    if (!PyArg_ParseTuple(args, "iy*:ec_scalar", &index, &material))
        return NULL;
    const curve_info *c = curve_arg(index);
    if (c == NULL)
        goto done;
    if (!ec_parts(c, span_of(&material), &d, &point)) {
        bad_key(c->name);
        goto done;
    }
    /* The export result: the caller's from here on. */
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)c->size);
    if (result != NULL) {
        char *p = PyBytes_AS_STRING(result);
        memset(p, 0, c->size - d.n);
        memcpy(p + c->size - d.n, d.p, d.n);
    }
done:
    PyBuffer_Release(&material);
    return result;
}

/* -- RSA ------------------------------------------------------------------------------ */

static int rsa_parts_of(span der, rsa_parts *r)
{
    pkcs8_info info;
    if (parse_pkcs8(der, &info))
        return info.alg == ALG_RSA && parse_rsa_private(info.key, r);
    return parse_rsa_private(der, r);
}

/* n and e are public; every other component is a secure BIGNUM owned by the RSA. */
static RSA *rsa_of(const rsa_parts *r)
{
    RSA *rsa = RSA_new();
    BIGNUM *n = BN_bin2bn(r->n.p, (int)r->n.n, NULL), *e = BN_bin2bn(r->e.p, (int)r->e.n, NULL);
    BIGNUM *d = secure_bn(r->d), *p = secure_bn(r->p), *q = secure_bn(r->q);
    BIGNUM *dp = secure_bn(r->dp), *dq = secure_bn(r->dq), *qi = secure_bn(r->qi);
    if (rsa == NULL || !n || !e || !d || !p || !q || !dp || !dq || !qi) {
        BN_free(n);
        BN_free(e);
        BN_clear_free(d);
        BN_clear_free(p);
        BN_clear_free(q);
        BN_clear_free(dp);
        BN_clear_free(dq);
        BN_clear_free(qi);
        RSA_free(rsa);
        return NULL;
    }
    /* With every argument non-NULL these cannot fail; RSA_free BN_clear_frees them. */
    RSA_set0_key(rsa, n, e, d);
    RSA_set0_factors(rsa, p, q);
    RSA_set0_crt_params(rsa, dp, dq, qi);
    return rsa;
}

static const BIGNUM **rsa_components(const RSA *rsa, const BIGNUM *v[8])
{
    RSA_get0_key(rsa, &v[0], &v[1], &v[2]);
    RSA_get0_factors(rsa, &v[3], &v[4]);
    RSA_get0_crt_params(rsa, &v[5], &v[6], &v[7]);
    return v;
}

static size_t rsa_pkcs8_len(const BIGNUM *v[8], size_t *inner_out, size_t *octets_out,
                            size_t *body_out)
{
    size_t inner = 3;
    for (int i = 0; i < 8; i++)
        inner += head_len(int_len(v[i])) + int_len(v[i]);
    size_t octets = head_len(inner) + inner;
    size_t body = 3 + 15 + head_len(octets) + octets;
    *inner_out = inner;
    *octets_out = octets;
    *body_out = body;
    return head_len(body) + body;
}

/* Writes RFC 5208 around RFC 8017 into `out`; returns its length, 0 if `cap` is too small. */
static size_t rsa_write_pkcs8(const RSA *rsa, unsigned char *out, size_t cap)
{
    const BIGNUM *v[8];
    size_t inner, octets, body;
    size_t total = rsa_pkcs8_len(rsa_components(rsa, v), &inner, &octets, &body);
    if (total > cap)
        return 0;
    writer w = {out};
    put_head(&w, 0x30, body);
    put(&w, "\x02\x01\x00\x30\x0d\x06\x09", 7);
    put(&w, OID_RSA, sizeof OID_RSA);
    put(&w, "\x05\x00", 2);
    put_head(&w, 0x04, octets);
    put_head(&w, 0x30, inner);
    put(&w, "\x02\x01\x00", 3);
    for (int i = 0; i < 8; i++)
        put_int(&w, v[i]);
    return total;
}

/* The public half for the Python side: (length written, n, e). */
static PyObject *rsa_result(const RSA *rsa, size_t written)
{
    const BIGNUM *n, *e;
    RSA_get0_key(rsa, &n, &e, NULL);
    PyObject *nb = PyBytes_FromStringAndSize(NULL, BN_num_bytes(n));
    PyObject *eb = PyBytes_FromStringAndSize(NULL, BN_num_bytes(e));
    PyObject *result = NULL;
    if (nb != NULL && eb != NULL) {
        BN_bn2bin(n, (unsigned char *)PyBytes_AS_STRING(nb));
        BN_bn2bin(e, (unsigned char *)PyBytes_AS_STRING(eb));
        result = Py_BuildValue("nOO", (Py_ssize_t)written, nb, eb);
    }
    Py_XDECREF(nb);
    Py_XDECREF(eb);
    return result;
}

/*
 * What RSA_check_key checks, with secure temporaries: RSA_check_key's own temporaries
 * (d mod p-1 among them) are plain BIGNUMs freed without cleansing.
 */
static int rsa_consistent(const RSA *rsa)
{
    const BIGNUM *v[8];
    rsa_components(rsa, v);
    const BIGNUM *n = v[0], *e = v[1], *d = v[2], *p = v[3], *q = v[4];
    BN_CTX *ctx = BN_CTX_secure_new();
    int ok = 0;
    if (ctx == NULL)
        return -1;
    BN_CTX_start(ctx);
    BIGNUM *t = BN_CTX_get(ctx), *p1 = BN_CTX_get(ctx), *q1 = BN_CTX_get(ctx);
    if (q1 == NULL)
        goto done;
    if (!BN_is_odd(e) || BN_is_one(e) || BN_cmp(p, q) == 0)
        goto done;
    if (!BN_mul(t, p, q, ctx) || BN_cmp(t, n) != 0)
        goto done;
    if (!BN_sub(p1, p, BN_value_one()) || !BN_sub(q1, q, BN_value_one()))
        goto done;
    /* d*e = 1 mod p-1 and mod q-1, and the CRT values are the reductions of d */
    if (!BN_mod_mul(t, d, e, p1, ctx) || !BN_is_one(t))
        goto done;
    if (!BN_mod_mul(t, d, e, q1, ctx) || !BN_is_one(t))
        goto done;
    if (!BN_mod(t, d, p1, ctx) || BN_cmp(t, v[5]) != 0)
        goto done;
    if (!BN_mod(t, d, q1, ctx) || BN_cmp(t, v[6]) != 0)
        goto done;
    if (!BN_mod_mul(t, v[7], q, p, ctx) || !BN_is_one(t) || BN_cmp(v[7], p) >= 0)
        goto done;
    if (BN_check_prime(p, ctx, NULL) != 1 || BN_check_prime(q, ctx, NULL) != 1)
        goto done;
    ok = 1;
done:
    BN_CTX_end(ctx);
    BN_CTX_free(ctx);
    ERR_clear_error();
    return ok;
}

static PyObject *rsa_import_impl(PyObject *args)
{
    Py_buffer data, out;
    PyObject *result = NULL;
    rsa_parts parts;
    RSA *rsa = NULL;
    int ok = 0;
    size_t written = 0;
    if (!PyArg_ParseTuple(args, "y*w*:rsa_import", &data, &out))
        return NULL;
    secure_heap_init();
    if (!rsa_parts_of(span_of(&data), &parts)) {
        bad_key("RSA private key");
        goto done;
    }
    rsa = rsa_of(&parts);
    if (rsa == NULL) {
        ossl_failed("load an RSA key");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    ok = rsa_consistent(rsa);
    Py_END_ALLOW_THREADS
    if (ok != 1) {
        if (ok < 0)
            ossl_failed("check an RSA key");
        else
            bad_key("RSA private key");
        goto done;
    }
    written = rsa_write_pkcs8(rsa, out.buf, (size_t)out.len);
    if (written == 0) {
        PyErr_SetString(PyExc_ValueError, "output buffer is too small");
        goto done;
    }
    result = rsa_result(rsa, written);
done:
    RSA_free(rsa);
    PyBuffer_Release(&out);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *rsa_generate_impl(PyObject *args)
{
    int bits, ok = 0;
    Py_buffer out;
    PyObject *result = NULL;
    RSA *rsa = NULL;
    BIGNUM *e = NULL;
    size_t written = 0;
    if (!PyArg_ParseTuple(args, "iw*:rsa_generate", &bits, &out))
        return NULL;
    if (bits < 2048 || bits > 8192) {
        PyErr_SetString(PyExc_ValueError, "RSA keys are 2048 to 8192 bits");
        goto done;
    }
    secure_heap_init();
    rsa = RSA_new();
    e = BN_new();
    if (rsa == NULL || e == NULL || !BN_set_word(e, RSA_F4)) {
        ossl_failed("generate an RSA key");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    ok = RSA_generate_key_ex(rsa, bits, e, NULL) == 1;
    if (ok)
        written = rsa_write_pkcs8(rsa, out.buf, (size_t)out.len);
    Py_END_ALLOW_THREADS
    if (!ok) {
        ossl_failed("generate an RSA key");
        goto done;
    }
    if (written == 0) {
        PyErr_SetString(PyExc_ValueError, "output buffer is too small");
        goto done;
    }
    result = rsa_result(rsa, written);
done:
    BN_free(e);
    RSA_free(rsa);
    PyBuffer_Release(&out);
    return result;
}

/* The RSA key stored in `material` (PKCS#8 in guarded memory), its private integers in
   secure BIGNUMs, with the secure heap ready; NULL with a Python error set otherwise. */
static RSA *rsa_stored_key(const Py_buffer *material)
{
    rsa_parts parts;
    secure_heap_init();
    if (!rsa_parts_of(span_of(material), &parts)) {
        bad_key("RSA private key");
        return NULL;
    }
    RSA *rsa = rsa_of(&parts);
    if (rsa == NULL)
        ossl_failed("load an RSA key");
    return rsa;
}

static PyObject *rsa_sign_impl(PyObject *args)
{
    Py_buffer material, digest;
    int mode, ok = 0;
    PyObject *result = NULL;
    RSA *rsa = NULL;
    unsigned char *em = NULL;
    if (!PyArg_ParseTuple(args, "y*y*i:rsa_sign", &material, &digest, &mode))
        return NULL;
    /* mode 0: PKCS#1 v1.5 over SHA-256 or SHA-512 (told apart by the digest's length);
       1: PSS over SHA-256 only; 2: PKCS#1 v1.5 padding (block type 1) of the caller's
       block as given, at most RSA_size - 11 bytes (PKCS#11's CKM_RSA_PKCS) */
    int pss = mode == 1, raw = mode == 2;
    if (mode < 0 || mode > 2) {
        PyErr_SetString(PyExc_ValueError, "rsa_sign: mode is 0, 1 or 2");
        goto done;
    }
    if (!raw && digest.len != 32 && !(digest.len == 64 && !pss)) {
        PyErr_SetString(PyExc_ValueError,
                        "RSA signatures here take a SHA-256 digest (or SHA-512 for PKCS#1 v1.5)");
        goto done;
    }
    rsa = rsa_stored_key(&material);
    if (rsa == NULL)
        goto done;
    int size = RSA_size(rsa);
    if (raw && (digest.len < 1 || digest.len > size - 11)) {
        PyErr_SetString(PyExc_ValueError, "a PKCS#1 v1.5 block is 1 to the key's size - 11 bytes");
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, size);
    em = OPENSSL_malloc((size_t)size);
    if (result == NULL || em == NULL) {
        Py_CLEAR(result);
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    unsigned char *sig = (unsigned char *)PyBytes_AS_STRING(result);
    Py_BEGIN_ALLOW_THREADS
    if (raw) {
        ok = RSA_private_encrypt((int)digest.len, digest.buf, sig, rsa, RSA_PKCS1_PADDING) == size;
    } else if (pss) {
        /* EMSA-PSS with MGF1-SHA256 and a salt as long as the digest */
        ok = RSA_padding_add_PKCS1_PSS_mgf1(rsa, em, digest.buf, EVP_sha256(), EVP_sha256(),
                                            RSA_PSS_SALTLEN_DIGEST) == 1 &&
             RSA_private_encrypt(size, em, sig, rsa, RSA_NO_PADDING) == size;
    } else {
        unsigned int len = 0;
        int nid = digest.len == 64 ? NID_sha512 : NID_sha256;
        ok = RSA_sign(nid, digest.buf, (unsigned)digest.len, sig, &len, rsa) == 1 &&
             len == (unsigned)size;
    }
    Py_END_ALLOW_THREADS
    if (!ok) {
        Py_CLEAR(result);
        ossl_failed("sign with an RSA key");
    }
done:
    if (em != NULL)
        OPENSSL_clear_free(em, (size_t)RSA_size(rsa));
    RSA_free(rsa);
    PyBuffer_Release(&digest);
    PyBuffer_Release(&material);
    return result;
}

static PyObject *rsa_decrypt_impl(PyObject *args)
{
    Py_buffer material, ciphertext;
    int sha1, n = -1;
    PyObject *result = NULL;
    RSA *rsa = NULL;
    unsigned char *em = NULL, *plain = NULL;
    size_t size = 0;
    if (!PyArg_ParseTuple(args, "y*y*p:rsa_decrypt", &material, &ciphertext, &sha1))
        return NULL;
    rsa = rsa_stored_key(&material);
    if (rsa == NULL)
        goto done;
    size = (size_t)RSA_size(rsa);
    em = OPENSSL_malloc(size);
    plain = OPENSSL_malloc(size);
    if (em == NULL || plain == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if ((size_t)ciphertext.len == size) {
        const EVP_MD *md = sha1 ? EVP_sha1() : EVP_sha256();
        Py_BEGIN_ALLOW_THREADS
        /* The raw RSA step, then the constant-time OAEP check that RSA_private_decrypt
           itself runs for OAEP (which it offers with SHA-1 only). */
        if (RSA_private_decrypt((int)size, ciphertext.buf, em, rsa, RSA_NO_PADDING) == (int)size)
            n = RSA_padding_check_PKCS1_OAEP_mgf1(plain, (int)size, em, (int)size, (int)size,
                                                  NULL, 0, md, md);
        Py_END_ALLOW_THREADS
    }
    ERR_clear_error();
    if (n < 0)
        PyErr_SetString(PyExc_ValueError, "RSA-OAEP decryption failed");
    else
        result = PyBytes_FromStringAndSize((const char *)plain, n);
done:
    if (em != NULL)
        OPENSSL_clear_free(em, size);
    if (plain != NULL)
        OPENSSL_clear_free(plain, size);
    RSA_free(rsa);
    PyBuffer_Release(&ciphertext);
    PyBuffer_Release(&material);
    return result;
}

/* -- Ed25519/X25519 PKCS#8 (RFC 8410) ------------------------------------------------- */

static PyObject *pkcs8_25519_impl(PyObject *args)
{
    Py_buffer data, out;
    int x25519;
    PyObject *result = NULL;
    pkcs8_info info;
    span seed;
    if (!PyArg_ParseTuple(args, "y*pw*:pkcs8_25519", &data, &x25519, &out))
        return NULL;
    const char *what = x25519 ? "X25519 private key" : "Ed25519 private key";
    if (!parse_pkcs8(span_of(&data), &info) ||
        info.alg != (x25519 ? ALG_X25519 : ALG_ED25519) ||
        !der_next(&info.key, 0x04, &seed) || info.key.n != 0 || seed.n != 32) {
        bad_key(what);
        goto done;
    }
    if (out.len != 32) {
        PyErr_SetString(PyExc_ValueError, "output buffer has the wrong size");
        goto done;
    }
    memcpy(out.buf, seed.p, 32);
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&data);
    return result;
}

/* -- PEM (RFC 7468) ------------------------------------------------------------------- */

static const char *const PEM_LABELS[] = {"PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY"};

static int b64_value(unsigned char ch)
{
    if (ch >= 'A' && ch <= 'Z')
        return ch - 'A';
    if (ch >= 'a' && ch <= 'z')
        return ch - 'a' + 26;
    if (ch >= '0' && ch <= '9')
        return ch - '0' + 52;
    if (ch == '+')
        return 62;
    if (ch == '/')
        return 63;
    return -1;
}

/* Finds the first "-----BEGIN <label>-----" with an accepted label (others, such as
   "EC PARAMETERS" before an EC key, are skipped). */
static const unsigned char *pem_find(const unsigned char *p, const unsigned char *end,
                                     const char **label)
{
    static const char begin[] = "-----BEGIN ";
    for (; p < end; p++) {
        if ((size_t)(end - p) >= sizeof begin - 1 &&
            memcmp(p, begin, sizeof begin - 1) == 0) {
            const unsigned char *q = p + sizeof begin - 1;
            for (size_t i = 0; i < sizeof PEM_LABELS / sizeof PEM_LABELS[0]; i++) {
                size_t n = strlen(PEM_LABELS[i]);
                if ((size_t)(end - q) >= n + 5 && memcmp(q, PEM_LABELS[i], n) == 0 &&
                    memcmp(q + n, "-----", 5) == 0) {
                    *label = PEM_LABELS[i];
                    return q + n + 5;
                }
            }
        }
    }
    return NULL;
}

static PyObject *pem_to_der_impl(PyObject *args)
{
    Py_buffer pem, out;
    PyObject *result = NULL;
    const char *label = NULL;
    if (!PyArg_ParseTuple(args, "y*w*:pem_to_der", &pem, &out))
        return NULL;
    const unsigned char *p = pem.buf, *end = p + pem.len;
    unsigned char *o = out.buf, *const o_start = o, *const o_end = o + out.len;
    unsigned long acc = 0;
    int nbits = 0, quad = 0, pad = 0, ok = 0;
    p = pem_find(p, end, &label);
    if (p != NULL) {
        char tail[64];
        int tail_len = snprintf(tail, sizeof tail, "-----END %s-----", label);
        for (; p < end; p++) {
            unsigned char ch = *p;
            if (ch == '-') {
                ok = (size_t)(end - p) >= (size_t)tail_len &&
                     memcmp(p, tail, (size_t)tail_len) == 0 && quad == 0 && o > o_start;
                break;
            }
            if (ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n')
                continue;
            if (ch == '=') { /* "xx==" or "xxx=" ends the data */
                if (quad < 2)
                    break;
                pad++;
                quad = (quad + 1) & 3;
                continue;
            }
            int v = b64_value(ch);
            if (v < 0 || pad) /* a header line ("Proc-Type:", encrypted PEM) or junk */
                break;
            acc = ((acc << 6) | (unsigned)v) & 0xffffff;
            nbits += 6;
            quad = (quad + 1) & 3;
            if (nbits >= 8) {
                nbits -= 8;
                if (o == o_end)
                    break;
                *o++ = (unsigned char)(acc >> nbits);
            }
        }
    }
    acc = 0;
    if (!ok) {
        OPENSSL_cleanse(out.buf, (size_t)out.len);
        PyErr_SetString(PyExc_ValueError, "the key material is not an unencrypted PEM private key");
    } else {
        result = PyLong_FromSsize_t(o - o_start);
    }
    PyBuffer_Release(&out);
    PyBuffer_Release(&pem);
    return result;
}

static PyObject *der_to_pem_impl(PyObject *args)
{
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    Py_buffer der;
    const char *label;
    if (!PyArg_ParseTuple(args, "y*s:der_to_pem", &der, &label))
        return NULL;
    size_t n = (size_t)der.len, b64 = 4 * ((n + 2) / 3), lines = (b64 + 63) / 64;
    size_t label_len = strlen(label);
    size_t total = (11 + label_len + 6) + b64 + lines + (9 + label_len + 6);
    /* The export result: one bytes object, the caller's from here on. */
    PyObject *result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (result != NULL) {
        char *o = PyBytes_AS_STRING(result);
        const unsigned char *s = der.buf;
        o += sprintf(o, "-----BEGIN %s-----\n", label);
        size_t col = 0;
        for (size_t i = 0; i < n; i += 3) {
            unsigned long v = (unsigned long)s[i] << 16;
            if (i + 1 < n)
                v |= (unsigned long)s[i + 1] << 8;
            if (i + 2 < n)
                v |= s[i + 2];
            *o++ = alphabet[(v >> 18) & 63];
            *o++ = alphabet[(v >> 12) & 63];
            *o++ = i + 1 < n ? alphabet[(v >> 6) & 63] : '=';
            *o++ = i + 2 < n ? alphabet[v & 63] : '=';
            v = 0;
            col += 4;
            if (col == 64 || i + 3 >= n) {
                *o++ = '\n';
                col = 0;
            }
        }
        sprintf(o, "-----END %s-----\n", label);
    }
    PyBuffer_Release(&der);
    return result;
}

static PyObject *m_secure_heap(PyObject *m, PyObject *Py_UNUSED(args))
{
    (void)m;
    secure_heap_init();
    return PyLong_FromLong(secure_heap_state);
}

/* Each entry point runs in its own frame, then scrubs the stack that frame's callees used. */
#define SCRUBBED(name)                                                                       \
    static PyObject *m_##name(PyObject *m, PyObject *args)                                   \
    {                                                                                        \
        (void)m;                                                                             \
        PyObject *r = name##_impl(args);                                                     \
        scrub_stack();                                                                       \
        return r;                                                                            \
    }
/* keep the work out of the wrapper's frame so scrub_stack's array covers it */
#define NOINLINE(name) static __attribute__((noinline)) PyObject *name##_impl(PyObject *args);
NOINLINE(ec_pkcs8_size)
NOINLINE(ec_import)
NOINLINE(ec_generate)
NOINLINE(ec_sign)
NOINLINE(ec_ecdh)
NOINLINE(ec_scalar)
NOINLINE(rsa_import)
NOINLINE(rsa_generate)
NOINLINE(rsa_sign)
NOINLINE(rsa_decrypt)
NOINLINE(pkcs8_25519)
NOINLINE(pem_to_der)
NOINLINE(der_to_pem)
SCRUBBED(ec_pkcs8_size)
SCRUBBED(ec_import)
SCRUBBED(ec_generate)
SCRUBBED(ec_sign)
SCRUBBED(ec_ecdh)
SCRUBBED(ec_scalar)
SCRUBBED(rsa_import)
SCRUBBED(rsa_generate)
SCRUBBED(rsa_sign)
SCRUBBED(rsa_decrypt)
SCRUBBED(pkcs8_25519)
SCRUBBED(pem_to_der)
SCRUBBED(der_to_pem)

static PyMethodDef keyops_methods[] = {
    {"keyops_secure_heap", m_secure_heap, METH_NOARGS,
     "keyops_secure_heap() -> int: CRYPTO_secure_malloc_init's result (1 locked, 2 not "
     "locked, 0 none: secure BIGNUMs are then cleansed on free but live in the plain heap)"},
    {"ec_pkcs8_size", m_ec_pkcs8_size, METH_VARARGS, "ec_pkcs8_size(curve) -> int"},
    {"ec_import", m_ec_import, METH_VARARGS,
     "ec_import(curve, data, raw, out) -> public point: raw scalar or PKCS#8/SEC1 DER, "
     "validated, written to out as PKCS#8"},
    {"ec_generate", m_ec_generate, METH_VARARGS,
     "ec_generate(curve, out) -> public point; PKCS#8 written to out"},
    {"ec_sign", m_ec_sign, METH_VARARGS, "ec_sign(curve, material, digest) -> DER signature"},
    {"ec_ecdh", m_ec_ecdh, METH_VARARGS,
     "ec_ecdh(curve, material, peer_point, out): the shared x-coordinate into out"},
    {"ec_scalar", m_ec_scalar, METH_VARARGS, "ec_scalar(curve, material) -> the scalar"},
    {"rsa_import", m_rsa_import, METH_VARARGS,
     "rsa_import(data, out) -> (length, n, e): PKCS#8/PKCS#1 DER, checked, PKCS#8 into out"},
    {"rsa_generate", m_rsa_generate, METH_VARARGS,
     "rsa_generate(bits, out) -> (length, n, e): e = 65537, PKCS#8 into out"},
    {"rsa_sign", m_rsa_sign, METH_VARARGS,
     "rsa_sign(material, digest, mode) -> signature (0: PKCS#1 v1.5 over a SHA-256 or "
     "SHA-512 digest, 1: PSS over a SHA-256 digest, 2: PKCS#1 v1.5 padding of the block as "
     "given)"},
    {"rsa_decrypt", m_rsa_decrypt, METH_VARARGS,
     "rsa_decrypt(material, ciphertext, sha1) -> plaintext (OAEP, MGF1 with the same hash)"},
    {"pkcs8_25519", m_pkcs8_25519, METH_VARARGS,
     "pkcs8_25519(data, x25519, out): the 32-byte private key of RFC 8410 PKCS#8 into out"},
    {"pem_to_der", m_pem_to_der, METH_VARARGS,
     "pem_to_der(pem, out) -> length: an unencrypted private key PEM block decoded into out"},
    {"der_to_pem", m_der_to_pem, METH_VARARGS, "der_to_pem(der, label) -> PEM bytes"},
    {NULL, NULL, 0, NULL},
};

int keyops_add_methods(PyObject *module) { return PyModule_AddFunctions(module, keyops_methods); }
