// The slimcore._C Python module. Importing it loads this shared library, whose static
// TORCH_LIBRARY initialisers register the ops; the module itself is empty. Built against the
// limited API, so one wheel serves every CPython >= 3.10, and without pybind11.
#include <Python.h>

static struct PyModuleDef slimcore_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

extern "C" PyObject* PyInit__C(void) {
  return PyModule_Create(&slimcore_module);
}
