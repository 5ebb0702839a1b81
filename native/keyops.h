/* The vault's EC/RSA key operations (native/keyops.c), added to guarded.c's module. */
#ifndef STRONGROOM_KEYOPS_H
#define STRONGROOM_KEYOPS_H
#include <Python.h>
int keyops_add_methods(PyObject *module);
#endif
