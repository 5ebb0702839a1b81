/* The audit log's append (native/auditline.c), registered in guarded.c's module table. */
#ifndef STRONGROOM_AUDITLINE_H
#define STRONGROOM_AUDITLINE_H
#include <Python.h>
PyObject *m_audit_append(PyObject *m, PyObject *args);
#endif
