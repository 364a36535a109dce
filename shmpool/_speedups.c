/* The hot path of shmpool in C: Pool.acquire on a cache hit, and Lease.release.
 *
 * Everything here has a pure-Python twin in buffer.py and client.py, which is
 * used when this module is not built; the two must behave identically. Only
 * the common case lives here: a positive int size whose class cache holds a
 * slot. Everything else (a miss, a bad argument, an oversize request, a closed
 * pool) is handed to the Python slow path unchanged, so errors are raised in
 * one place. A release appends the slot to its home cache and, past the cache's
 * high-water mark, calls the pool's Python _trim().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>

static PyObject *LeaseClosedError;
static PyObject *s_release, *s_home, *s_view, *s_append, *s_high, *s_pool, *s_trim;
static PyObject *memoryview_release; /* the unbound memoryview.release */

/* buffer._Slot and buffer._Cache are Python classes with __slots__; reading
 * their slots at the member offsets saves an attribute lookup each (configure()
 * finds the offsets). Objects of any other type go through getattr. */
static PyTypeObject *SlotType, *CacheType;
static Py_ssize_t off_slot_view = -1, off_slot_home = -1, off_cache_high = -1;

static PyObject *
get_field(PyObject *obj, PyTypeObject *type, Py_ssize_t offset, PyObject *name)
{
    if (offset >= 0 && Py_TYPE(obj) == type) {
        PyObject *v = *(PyObject **)((char *)obj + offset);
        if (v != NULL) {
            Py_INCREF(v);
            return v;
        }
    }
    return PyObject_GetAttr(obj, name);
}

static Py_ssize_t
member_offset(PyTypeObject *type, const char *name)
{
    PyObject *d = PyObject_GetAttrString((PyObject *)type, name);
    if (d == NULL)
        return -1;
    Py_ssize_t offset = -1;
    if (Py_IS_TYPE(d, &PyMemberDescr_Type)) {
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type == T_OBJECT_EX)
            offset = m->offset;
    }
    Py_DECREF(d);
    if (offset < 0)
        PyErr_Format(PyExc_TypeError, "%s.%s is not a __slots__ member", type->tp_name, name);
    return offset;
}

/* ------------------------------------------------------------ LeaseBase */

typedef struct {
    PyObject_HEAD
    PyObject *slot; /* a buffer._Slot */
    PyObject *view; /* the memoryview handed out; NULL once released */
} LeaseObject;

/* Leases take part in garbage collection: a traceback that keeps a frame
 * holding a lease alive, and the pool that lease leads back to, must remain
 * collectable as a cycle. */
static int
lease_traverse(LeaseObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->slot);
    Py_VISIT(self->view);
    return 0;
}

static int
lease_clear(LeaseObject *self)
{
    Py_CLEAR(self->slot);
    Py_CLEAR(self->view);
    return 0;
}

static void
lease_dealloc(LeaseObject *self)
{
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->slot);
    Py_CLEAR(self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
lease_new_raw(PyTypeObject *type, PyObject *slot, Py_ssize_t size)
{
    PyObject *whole = get_field(slot, SlotType, off_slot_view, s_view);
    if (whole == NULL)
        return NULL;
    PyObject *view = PySequence_GetSlice(whole, 0, size);
    Py_DECREF(whole);
    if (view == NULL)
        return NULL;
    LeaseObject *lease = (LeaseObject *)type->tp_alloc(type, 0);
    if (lease == NULL) {
        Py_DECREF(view);
        return NULL;
    }
    Py_INCREF(slot);
    lease->slot = slot;
    lease->view = view;
    return (PyObject *)lease;
}

/* Close the lease: release the view it handed out. 1 done, 0 closed already, -1 error. */
static int
lease_close_view(LeaseObject *self)
{
    PyObject *view = self->view;
    if (view == NULL)
        return 0;
    self->view = NULL;
    PyObject *r = PyObject_CallOneArg(memoryview_release, view);
    Py_DECREF(view);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 1;
}

static PyObject *
lease_release(LeaseObject *self, PyObject *Py_UNUSED(ignored))
{
    int closed = lease_close_view(self);
    if (closed <= 0)
        return closed < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *r;
    PyObject *slot = self->slot;
    PyObject *home = get_field(slot, SlotType, off_slot_home, s_home);
    if (home == NULL)
        return NULL;
    if (!PyList_Check(home)) { /* an oversize home: its append() talks to the manager */
        r = PyObject_CallMethodOneArg(home, s_append, slot);
        Py_DECREF(home);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
        Py_RETURN_NONE;
    }
    if (PyList_Append(home, slot) < 0) {
        Py_DECREF(home);
        return NULL;
    }
    PyObject *high = get_field(home, CacheType, off_cache_high, s_high);
    if (high == NULL) {
        Py_DECREF(home);
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(high);
    Py_DECREF(high);
    if (limit == -1 && PyErr_Occurred()) {
        Py_DECREF(home);
        return NULL;
    }
    if (PyList_GET_SIZE(home) > limit) {
        PyObject *pool = PyObject_GetAttr(home, s_pool);
        if (pool == NULL) {
            Py_DECREF(home);
            return NULL;
        }
        r = PyObject_CallMethodOneArg(pool, s_trim, home);
        Py_DECREF(pool);
        if (r == NULL) {
            Py_DECREF(home);
            return NULL;
        }
        Py_DECREF(r);
    }
    Py_DECREF(home);
    Py_RETURN_NONE;
}

static PyObject *
lease_get_view(LeaseObject *self, void *Py_UNUSED(closure))
{
    if (self->view == NULL) {
        PyErr_SetString(LeaseClosedError, "this lease was released; acquire a new one");
        return NULL;
    }
    Py_INCREF(self->view);
    return self->view;
}

static PyObject *
lease_get_raw_view(LeaseObject *self, void *Py_UNUSED(closure))
{
    PyObject *v = self->view ? self->view : Py_None;
    Py_INCREF(v);
    return v;
}

static PyObject *
lease_get_slot(LeaseObject *self, void *Py_UNUSED(closure))
{
    PyObject *s = self->slot ? self->slot : Py_None;
    Py_INCREF(s);
    return s;
}

static PyObject *
lease_exit(LeaseObject *self, PyObject *Py_UNUSED(args))
{
    return lease_release(self, NULL);
}

static PyObject *
lease_enter(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    Py_INCREF(self);
    return self;
}

static PyObject *
lease_tp_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyErr_SetString(PyExc_TypeError, "leases come from Pool.acquire()");
    return NULL;
}

/* Forget the slot without returning it: its ownership moved elsewhere. */
static PyObject *
lease_disown(LeaseObject *self, PyObject *Py_UNUSED(ignored))
{
    int closed = lease_close_view(self);
    return closed < 0 ? NULL : PyBool_FromLong(closed);
}

static PyMethodDef lease_methods[] = {
    {"release", (PyCFunction)lease_release, METH_NOARGS,
     "Give the slot back to the pool; calling it again does nothing."},
    {"close", (PyCFunction)lease_release, METH_NOARGS, "Same as release()."},
    {"__enter__", (PyCFunction)lease_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)lease_exit, METH_VARARGS, NULL},
    {"_disown", (PyCFunction)lease_disown, METH_NOARGS, NULL},
    {NULL},
};

static PyGetSetDef lease_getset[] = {
    {"view", (getter)lease_get_view, NULL,
     "The writable memoryview; raises LeaseClosedError once released.", NULL},
    {"_view", (getter)lease_get_raw_view, NULL, NULL, NULL},
    {"_slot", (getter)lease_get_slot, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject LeaseBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmpool._speedups.LeaseBase",
    .tp_basicsize = sizeof(LeaseObject),
    .tp_dealloc = (destructor)lease_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C core of shmpool.Lease.",
    .tp_traverse = (traverseproc)lease_traverse,
    .tp_clear = (inquiry)lease_clear,
    .tp_methods = lease_methods,
    .tp_getset = lease_getset,
    .tp_new = lease_tp_new,
};

/* ------------------------------------------------------------- Acquirer */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *lookup;     /* list indexed by (size - 1).bit_length() -> cache list */
    PyObject *slow;       /* the Python slow path, called with the same arguments */
    PyTypeObject *lease_type;
    Py_ssize_t hits;
} AcquirerObject;

static PyObject *acquirer_vectorcall(PyObject *, PyObject *const *, size_t, PyObject *);

static void
acquirer_dealloc(AcquirerObject *self)
{
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->lookup);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->lease_type);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
acquirer_traverse(AcquirerObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->lookup);
    Py_VISIT(self->slow);
    Py_VISIT(self->lease_type);
    return 0;
}

static int
acquirer_clear(AcquirerObject *self)
{
    Py_CLEAR(self->lookup);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->lease_type);
    return 0;
}

static int
acquirer_init(AcquirerObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *lookup, *slow, *lease_type;
    if (!PyArg_ParseTuple(args, "O!OO!", &PyList_Type, &lookup, &slow, &PyType_Type, &lease_type))
        return -1;
    if (!PyType_IsSubtype((PyTypeObject *)lease_type, &LeaseBaseType)) {
        PyErr_SetString(PyExc_TypeError, "lease_type must derive from LeaseBase");
        return -1;
    }
    Py_INCREF(lookup);
    Py_XSETREF(self->lookup, lookup);
    Py_INCREF(slow);
    Py_XSETREF(self->slow, slow);
    Py_INCREF(lease_type);
    Py_XSETREF(self->lease_type, (PyTypeObject *)lease_type);
    self->vectorcall = acquirer_vectorcall;
    return 0;
}

static PyObject *
acquirer_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    AcquirerObject *self = (AcquirerObject *)callable;
    if (kwnames == NULL && PyVectorcall_NARGS(nargsf) == 1 && self->lookup != NULL) {
        PyObject *arg = args[0];
        if (PyLong_CheckExact(arg)) {
            Py_ssize_t size = PyLong_AsSsize_t(arg);
            if (size > 0) {
                size_t m = (size_t)(size - 1);
                Py_ssize_t index = m ? (Py_ssize_t)(8 * sizeof(unsigned long long)) -
                                           __builtin_clzll((unsigned long long)m)
                                     : 0;
                PyObject *lookup = self->lookup;
                if (index < PyList_GET_SIZE(lookup)) {
                    PyObject *cache = PyList_GET_ITEM(lookup, index);
                    Py_ssize_t n = PyList_Check(cache) ? PyList_GET_SIZE(cache) : 0;
                    if (n > 0) {
                        PyObject *slot = PyList_GET_ITEM(cache, n - 1);
                        Py_INCREF(slot);
                        if (PyList_SetSlice(cache, n - 1, n, NULL) < 0) {
                            Py_DECREF(slot);
                            return NULL;
                        }
                        PyObject *lease = lease_new_raw(self->lease_type, slot, size);
                        if (lease == NULL) { /* put it back: nothing is lost */
                            PyObject *et, *ev, *tb;
                            PyErr_Fetch(&et, &ev, &tb);
                            if (PyList_Append(cache, slot) < 0)
                                PyErr_Clear();
                            PyErr_Restore(et, ev, tb);
                        }
                        Py_DECREF(slot);
                        if (lease != NULL)
                            self->hits++;
                        return lease;
                    }
                }
            }
            else if (size == -1 && PyErr_Occurred()) {
                PyErr_Clear(); /* too big for C: the slow path explains */
            }
        }
    }
    return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
}

static PyMemberDef acquirer_members[] = {
    {"lookup", T_OBJECT_EX, offsetof(AcquirerObject, lookup), 0, "the class lookup table"},
    {"hits", T_PYSSIZET, offsetof(AcquirerObject, hits), 0, "acquires served from the cache"},
    {NULL},
};

static PyTypeObject AcquirerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmpool._speedups.Acquirer",
    .tp_basicsize = sizeof(AcquirerObject),
    .tp_dealloc = (destructor)acquirer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(AcquirerObject, vectorcall),
    .tp_doc = "Pool.acquire: a cache hit in C, anything else in Python.",
    .tp_traverse = (traverseproc)acquirer_traverse,
    .tp_clear = (inquiry)acquirer_clear,
    .tp_call = PyVectorcall_Call,
    .tp_members = acquirer_members,
    .tp_init = (initproc)acquirer_init,
    .tp_new = PyType_GenericNew,
};

/* --------------------------------------------------------------- module */

static PyObject *
make_lease(PyObject *module, PyObject *args)
{
    PyObject *type, *slot;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "O!On", &PyType_Type, &type, &slot, &size))
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)type, &LeaseBaseType)) {
        PyErr_SetString(PyExc_TypeError, "type must derive from LeaseBase");
        return NULL;
    }
    return lease_new_raw((PyTypeObject *)type, slot, size);
}

static PyObject *
configure(PyObject *module, PyObject *args)
{
    PyObject *exc, *slot_type, *cache_type;
    if (!PyArg_ParseTuple(args, "OO!O!", &exc, &PyType_Type, &slot_type, &PyType_Type, &cache_type))
        return NULL;
    Py_ssize_t view = member_offset((PyTypeObject *)slot_type, "view");
    Py_ssize_t home = view < 0 ? -1 : member_offset((PyTypeObject *)slot_type, "home");
    Py_ssize_t high = home < 0 ? -1 : member_offset((PyTypeObject *)cache_type, "high");
    if (high < 0)
        return NULL;
    Py_INCREF(exc);
    Py_XSETREF(LeaseClosedError, exc);
    Py_INCREF(slot_type);
    Py_XSETREF(SlotType, (PyTypeObject *)slot_type);
    Py_INCREF(cache_type);
    Py_XSETREF(CacheType, (PyTypeObject *)cache_type);
    off_slot_view = view;
    off_slot_home = home;
    off_cache_high = high;
    Py_RETURN_NONE;
}

/* ------------------------------------------------- atomics on shared memory */

static uint64_t *
word_at(PyObject *obj, Py_ssize_t offset, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0)
        return NULL;
    if (offset < 0 || offset % 8 || offset + 8 > view->len || ((uintptr_t)view->buf) % 8) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "offset out of range or not 8-byte aligned");
        return NULL;
    }
    return (uint64_t *)((char *)view->buf + offset);
}

static PyObject *
cas64(PyObject *module, PyObject *args)
{
    PyObject *obj;
    Py_ssize_t offset;
    unsigned long long expected, desired;
    if (!PyArg_ParseTuple(args, "OnKK", &obj, &offset, &expected, &desired))
        return NULL;
    Py_buffer view;
    uint64_t *word = word_at(obj, offset, &view);
    if (word == NULL)
        return NULL;
    uint64_t want = expected;
    int ok = __atomic_compare_exchange_n(word, &want, (uint64_t)desired, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE);
    PyBuffer_Release(&view);
    return PyBool_FromLong(ok);
}

static PyObject *
load64(PyObject *module, PyObject *args)
{
    PyObject *obj;
    Py_ssize_t offset;
    if (!PyArg_ParseTuple(args, "On", &obj, &offset))
        return NULL;
    Py_buffer view;
    uint64_t *word = word_at(obj, offset, &view);
    if (word == NULL)
        return NULL;
    uint64_t value = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(value);
}

static PyObject *
store64(PyObject *module, PyObject *args)
{
    PyObject *obj;
    Py_ssize_t offset;
    unsigned long long value;
    if (!PyArg_ParseTuple(args, "OnK", &obj, &offset, &value))
        return NULL;
    Py_buffer view;
    uint64_t *word = word_at(obj, offset, &view);
    if (word == NULL)
        return NULL;
    __atomic_store_n(word, (uint64_t)value, __ATOMIC_RELEASE);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"make_lease", make_lease, METH_VARARGS, "make_lease(type, slot, size) -> Lease"},
    {"cas64", cas64, METH_VARARGS, "cas64(buffer, offset, expected, new) -> bool (atomic)"},
    {"load64", load64, METH_VARARGS, "load64(buffer, offset) -> int (atomic)"},
    {"store64", store64, METH_VARARGS, "store64(buffer, offset, value) (atomic)"},
    {"configure", configure, METH_VARARGS, "configure(LeaseClosedError, _Slot, _Cache)"},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "shmpool._speedups", "shmpool's hot path in C.", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&LeaseBaseType) < 0 || PyType_Ready(&AcquirerType) < 0)
        return NULL;
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(s_release, "release");
    INTERN(s_home, "home");
    INTERN(s_view, "view");
    INTERN(s_append, "append");
    INTERN(s_high, "high");
    INTERN(s_pool, "pool");
    INTERN(s_trim, "_trim");
    memoryview_release = PyObject_GetAttrString((PyObject *)&PyMemoryView_Type, "release");
    if (memoryview_release == NULL)
        return NULL;
    LeaseClosedError = PyExc_ValueError;
    Py_INCREF(LeaseClosedError);
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    Py_INCREF(&LeaseBaseType);
    Py_INCREF(&AcquirerType);
    if (PyModule_AddObject(m, "LeaseBase", (PyObject *)&LeaseBaseType) < 0 ||
        PyModule_AddObject(m, "Acquirer", (PyObject *)&AcquirerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
