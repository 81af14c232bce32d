// kvstore._copy_hash.RangeTable (range_table.cpp): the write guard's committed ranges.
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

// Adds the RangeTable type to ``module``; 0, or -1 with an exception set.
int kvstore_add_range_table(PyObject* module);
