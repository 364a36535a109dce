/* The hot path of shmpool in C: Pool.acquire on a cache hit, and Lease.release.
 *
 * Everything here has a pure-Python twin in buffer.py and client.py, which is
 * used when this module is not built; the two must behave identically. Only
 * the common case lives here: a positive int size whose class cache holds a
 * slot. Everything else (a miss, a bad argument, an oversize request, a closed
 * pool) is handed to the Python slow path unchanged, so errors are raised in
 * one place. A release appends the slot to its home cache and, past the cache's
 * high-water mark, calls the pool's Python _trim().
 *
 * Every lease counts its bytes in its pool's Meter from when it is made until
 * its view is released (lease_new_raw, lease_close_view), and a cache hit
 * counts its size; the pool reports both to the manager (Pool.usage()).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <pthread.h>
#include <unistd.h>

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

/* ---------------------------------------------------------------- Meter
 *
 * What a pool's leases use, buffer._PyMeter's twin: the bytes of the leases
 * open now, and the acquires made, each by k = (n - 1).bit_length(). Only
 * k <= 48 (protocol.MAX_SHIFT: no lease is longer) occurs, and only those are
 * reported; the arrays have a place for every k of a Py_ssize_t n, so the hot
 * paths index them without a bounds check. The GIL guards them. */

#define METER_REPORTED 49
#define METER_PLACES 64

typedef struct {
    PyObject_HEAD
    Py_ssize_t requested[METER_PLACES];
    Py_ssize_t sizes[METER_PLACES];
} MeterObject;

/* (n - 1).bit_length(), and 0 for n <= 1 (a lease of 0 bytes counts 0 bytes anywhere) */
static inline int
meter_bucket(Py_ssize_t n)
{
    return n > 1 ? 64 - __builtin_clzll((unsigned long long)(n - 1)) : 0;
}

static PyObject *
meter_tuple(const Py_ssize_t *counts)
{
    PyObject *t = PyTuple_New(METER_REPORTED);
    for (int k = 0; t != NULL && k < METER_REPORTED; k++) {
        PyObject *n = PyLong_FromSsize_t(counts[k]);
        if (n == NULL)
            Py_CLEAR(t);
        else
            PyTuple_SET_ITEM(t, k, n);
    }
    return t;
}

/* snapshot() -> (requested, sizes): two tuples of 49 ints. */
static PyObject *
meter_snapshot(MeterObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *requested = meter_tuple(self->requested);
    PyObject *sizes = requested ? meter_tuple(self->sizes) : NULL;
    PyObject *r = sizes ? PyTuple_Pack(2, requested, sizes) : NULL;
    Py_XDECREF(requested);
    Py_XDECREF(sizes);
    return r;
}

/* count_acquire(size): an acquire of `size` bytes returned a lease (the Python slow path's). */
static PyObject *
meter_count_acquire(MeterObject *self, PyObject *size)
{
    Py_ssize_t n = PyLong_AsSsize_t(size);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    self->sizes[meter_bucket(n)]++;
    Py_RETURN_NONE;
}

static PyMethodDef meter_methods[] = {
    {"snapshot", (PyCFunction)meter_snapshot, METH_NOARGS,
     "snapshot() -> (requested, sizes): 49 ints each, indexed by k"},
    {"count_acquire", (PyCFunction)meter_count_acquire, METH_O,
     "count_acquire(size): count an acquire that returned a lease"},
    {NULL},
};

/* No GC: a Meter holds no references, so no cycle runs through it. */
static PyTypeObject MeterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmpool._speedups.Meter",
    .tp_basicsize = sizeof(MeterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The bytes of a pool's open leases, and its acquires, by (n - 1).bit_length().",
    .tp_methods = meter_methods,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------ LeaseBase */

typedef struct {
    PyObject_HEAD
    PyObject *slot; /* a buffer._Slot */
    PyObject *view; /* the memoryview handed out; NULL once released */
    MeterObject *meter; /* counts `length` while view is set; never NULL */
    Py_ssize_t length;  /* len(view) when made (a view its user released no longer says) */
    PyObject *origin;   /* where it was acquired (a pool that tracks leases sets it), or NULL */
    PyObject *weakreflist; /* a tracking pool lists its leases by weak references */
} LeaseObject;

/* What a lease collected unreleased calls: buffer._dropped_slot (configure_finalizer). */
static PyObject *dropped_hook;
static int lease_close_view(LeaseObject *self);

/* Leases take part in garbage collection: a traceback that keeps a frame
 * holding a lease alive, and the pool that lease leads back to, must remain
 * collectable as a cycle. The meter is in no cycle (it holds no references):
 * only dealloc lets it go, so it is there for as long as the lease is. */
static int
lease_traverse(LeaseObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->slot);
    Py_VISIT(self->view);
    Py_VISIT(self->origin);
    return 0;
}

static void lease_drop_open(LeaseObject *self);

static int
lease_clear(LeaseObject *self)
{
    if (self->view != NULL) /* in a garbage cycle, still open */
        lease_drop_open(self);
    Py_CLEAR(self->slot);
    Py_CLEAR(self->view);
    Py_CLEAR(self->origin);
    return 0;
}

/* A lease destroyed while still open: close it, then buffer._dropped_slot
 * gives its slot back (unless the view is exported) and warns with
 * ResourceWarning. Done here and in lease_clear, not in a tp_finalize, so
 * that a released lease pays one test and no finalizer call; the hook gets
 * the slot, the length and the origin, never the lease, so no Python code
 * can reach (and resurrect) an object being destroyed. */
static void
lease_drop_open(LeaseObject *self)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    int closed;
    if (Py_REFCNT(self->view) > 1) /* `pool.acquire(n).view` kept: the view is in use */
        closed = -1;
    else if ((closed = lease_close_view(self)) < 0) /* exported: someone uses its memory */
        PyErr_Clear();
    if (closed != 0 && dropped_hook != NULL && self->slot != NULL) {
        PyObject *r = PyObject_CallFunction(dropped_hook, "OnOO", self->slot, self->length,
                                            self->origin ? self->origin : Py_None,
                                            closed > 0 ? Py_True : Py_False);
        if (r == NULL)
            PyErr_WriteUnraisable(dropped_hook);
        else
            Py_DECREF(r);
    }
    PyErr_Restore(type, value, tb);
}

static void
lease_dealloc(LeaseObject *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    if (self->view != NULL)
        lease_drop_open(self);
    Py_CLEAR(self->slot);
    Py_CLEAR(self->view);
    Py_CLEAR(self->meter);
    Py_CLEAR(self->origin);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A new lease over `slot` showing its first `size` bytes, counted in `meter`. */
static PyObject *
lease_new_raw(PyTypeObject *type, PyObject *slot, Py_ssize_t size, MeterObject *meter)
{
    PyObject *whole = get_field(slot, SlotType, off_slot_view, s_view);
    if (whole == NULL)
        return NULL;
    PyObject *view = PySequence_GetSlice(whole, 0, size);
    Py_DECREF(whole);
    if (view == NULL)
        return NULL;
    if (!PyMemoryView_Check(view)) { /* its length is read below */
        Py_DECREF(view);
        PyErr_SetString(PyExc_TypeError, "a slot's view must be a memoryview");
        return NULL;
    }
    LeaseObject *lease = (LeaseObject *)type->tp_alloc(type, 0);
    if (lease == NULL) {
        Py_DECREF(view);
        return NULL;
    }
    Py_INCREF(slot);
    lease->slot = slot;
    lease->view = view;
    Py_INCREF(meter);
    lease->meter = meter;
    lease->length = PyMemoryView_GET_BUFFER(view)->len;
    meter->requested[meter_bucket(lease->length)] += lease->length;
    return (PyObject *)lease;
}

/* Close the lease: release the view it handed out. 1 done, 0 closed already, -1 error.
 * The view goes first: while something exports it, it refuses (BufferError) and
 * the lease stays open, and counted, its slot neither returned nor lost
 * (buffer._close). No Python code runs in between, so no other thread closes
 * the lease meanwhile, and its bytes leave the meter once. */
static int
lease_close_view(LeaseObject *self)
{
    PyObject *view = self->view;
    if (view == NULL)
        return 0;
    PyObject *r = PyObject_CallOneArg(memoryview_release, view);
    if (r == NULL) {
        if (PyErr_ExceptionMatches(PyExc_BufferError)) { /* buffer._still_exported */
            PyObject *type, *cause, *tb;
            PyErr_Fetch(&type, &cause, &tb);
            PyErr_NormalizeException(&type, &cause, &tb);
            PyErr_Format(PyExc_BufferError,
                         "the lease's view is still exported (%S): release that export (a "
                         "PickleBuffer, a buffer held by a C extension or by I/O in another "
                         "thread) first, then close the lease again; it stays open until then",
                         cause);
            Py_XDECREF(type);
            Py_XDECREF(cause);
            Py_XDECREF(tb);
        }
        return -1;
    }
    Py_DECREF(r);
    self->view = NULL;
    self->meter->requested[meter_bucket(self->length)] -= self->length;
    Py_DECREF(view);
    return 1;
}

static int give_back(PyObject *home, PyObject *slot);

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
    if (!PyList_Check(home)) { /* another home: its append() decides */
        int done = give_back(home, slot); /* a borrowed slot, back to its lender by its word */
        if (done != 0) {
            Py_DECREF(home);
            if (done < 0)
                return NULL;
            Py_RETURN_NONE;
        }
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
lease_get_meter(LeaseObject *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->meter ? (PyObject *)self->meter : Py_None);
}

static PyObject *
lease_get_length(LeaseObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->length);
}

static PyObject *
lease_get_origin(LeaseObject *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->origin ? self->origin : Py_None);
}

static int
lease_set_origin(LeaseObject *self, PyObject *origin, void *Py_UNUSED(closure))
{
    Py_XSETREF(self->origin, origin == NULL || origin == Py_None ? NULL : Py_NewRef(origin));
    return 0;
}

/* The buffer protocol: memoryview(lease), bytes(lease), numpy.asarray(lease).
 * The export is one of the lease's view (its obj is that memoryview), so it
 * counts against it exactly like a PickleBuffer of lease.view: release()
 * refuses with BufferError while it lives. It shows what the view shows:
 * the `size` bytes asked for, writable unless the lease is a reader's. */
static int
lease_getbuffer(LeaseObject *self, Py_buffer *buffer, int flags)
{
    if (self->view == NULL) {
        PyErr_SetString(LeaseClosedError, "this lease was released; acquire a new one");
        buffer->obj = NULL;
        return -1;
    }
    return PyObject_GetBuffer(self->view, buffer, flags);
}

static PyBufferProcs lease_as_buffer = {
    .bf_getbuffer = (getbufferproc)lease_getbuffer,
    .bf_releasebuffer = NULL, /* the view's own release runs: the export's obj is the view */
};

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

static PyObject *lease_reduce(LeaseObject *self, PyObject *ignored);

/* __reduce_ex__(protocol): __reduce__ at once. Pickle asks for this first;
 * object's would look __reduce__ up and call it, 0.07 µs more. */
static PyObject *
lease_reduce_ex(LeaseObject *self, PyObject *Py_UNUSED(protocol))
{
    return lease_reduce(self, NULL);
}

static PyMethodDef lease_methods[] = {
    {"release", (PyCFunction)lease_release, METH_NOARGS,
     "Give the slot back to the pool; calling it again does nothing."},
    {"close", (PyCFunction)lease_release, METH_NOARGS, "Same as release()."},
    {"__enter__", (PyCFunction)lease_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)lease_exit, METH_VARARGS, NULL},
    {"_disown", (PyCFunction)lease_disown, METH_NOARGS, NULL},
    {"__reduce__", (PyCFunction)lease_reduce, METH_NOARGS, NULL},
    {"__reduce_ex__", (PyCFunction)lease_reduce_ex, METH_O, NULL},
    {NULL},
};

static PyGetSetDef lease_getset[] = {
    {"view", (getter)lease_get_view, NULL,
     "The writable memoryview; raises LeaseClosedError once released.", NULL},
    {"_view", (getter)lease_get_raw_view, NULL, NULL, NULL},
    {"_slot", (getter)lease_get_slot, NULL, NULL, NULL},
    {"_meter", (getter)lease_get_meter, NULL, "the Meter this lease counts in", NULL},
    {"_length", (getter)lease_get_length, NULL, "len(view) when made", NULL},
    {"_origin", (getter)lease_get_origin, (setter)lease_set_origin,
     "(monotonic time, frames) of the acquire, when its pool tracks leases; else None", NULL},
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
    .tp_as_buffer = &lease_as_buffer,
    .tp_weaklistoffset = offsetof(LeaseObject, weakreflist),
};

/* ------------------------------------------------------------- Acquirer */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *lookup;     /* list indexed by (size - 1).bit_length() -> cache list */
    PyObject *slow;       /* the Python slow path, called with the same arguments */
    PyTypeObject *lease_type;
    MeterObject *meter;   /* the pool's: a hit counts its size and its lease here */
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
    Py_CLEAR(self->meter);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
acquirer_traverse(AcquirerObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->lookup);
    Py_VISIT(self->slow);
    Py_VISIT(self->lease_type);
    return 0; /* the meter holds no references: it is in no cycle (see MeterType) */
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
    PyObject *lookup, *slow, *lease_type, *meter;
    if (!PyArg_ParseTuple(args, "O!OO!O!", &PyList_Type, &lookup, &slow, &PyType_Type,
                          &lease_type, &MeterType, &meter))
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
    Py_INCREF(meter);
    Py_XSETREF(self->meter, (MeterObject *)meter);
    self->vectorcall = acquirer_vectorcall;
    return 0;
}

static PyObject *
acquirer_get_meter(AcquirerObject *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->meter ? (PyObject *)self->meter : Py_None);
}

/* A pool's new connection counts in a new Meter (Pool._new_caches). */
static int
acquirer_set_meter(AcquirerObject *self, PyObject *meter, void *Py_UNUSED(closure))
{
    if (meter == NULL || !Py_IS_TYPE(meter, &MeterType)) {
        PyErr_SetString(PyExc_TypeError, "meter must be a Meter");
        return -1;
    }
    Py_INCREF(meter);
    Py_XSETREF(self->meter, (MeterObject *)meter);
    return 0;
}

static PyObject *
acquirer_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    AcquirerObject *self = (AcquirerObject *)callable;
    if (kwnames == NULL && PyVectorcall_NARGS(nargsf) == 1 && self->lookup != NULL &&
        self->meter != NULL) {
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
                        PyObject *lease = lease_new_raw(self->lease_type, slot, size, self->meter);
                        if (lease == NULL) { /* put it back: nothing is lost */
                            PyObject *et, *ev, *tb;
                            PyErr_Fetch(&et, &ev, &tb);
                            if (PyList_Append(cache, slot) < 0)
                                PyErr_Clear();
                            PyErr_Restore(et, ev, tb);
                        }
                        Py_DECREF(slot);
                        if (lease != NULL) {
                            self->hits++;
                            self->meter->sizes[index]++;
                        }
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

static PyGetSetDef acquirer_getset[] = {
    {"meter", (getter)acquirer_get_meter, (setter)acquirer_set_meter,
     "the Meter a hit counts in", NULL},
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
    .tp_getset = acquirer_getset,
    .tp_init = (initproc)acquirer_init,
    .tp_new = PyType_GenericNew,
};

/* --------------------------------------------------------------- module */

static PyObject *
make_lease(PyObject *module, PyObject *args)
{
    PyObject *type, *slot, *meter;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "O!OnO!", &PyType_Type, &type, &slot, &size, &MeterType, &meter))
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)type, &LeaseBaseType)) {
        PyErr_SetString(PyExc_TypeError, "type must derive from LeaseBase");
        return NULL;
    }
    return lease_new_raw((PyTypeObject *)type, slot, size, (MeterObject *)meter);
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

/* configure_finalizer(fn): fn(slot, length, origin, closed) runs for a lease
 * destroyed unreleased (closed: False if its view was exported, so kept). */
static PyObject *
configure_finalizer(PyObject *module, PyObject *fn)
{
    if (!PyCallable_Check(fn)) {
        PyErr_SetString(PyExc_TypeError, "configure_finalizer(fn): fn must be callable");
        return NULL;
    }
    Py_XSETREF(dropped_hook, Py_NewRef(fn));
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

/* ------------------------------------------------------------- handoff
 *
 * The common case of pickling a Lease (Pool._hand_off) and of unpickling one
 * (Pool._take), step for step as the Python code they replace did it: a
 * class slot whose ticket word this process swaps, with its notice queued.
 * Anything else returns None, and the caller takes the Python path, which
 * checks every condition again and raises what applies. Both run only with
 * tickets on, which needs this module, so they have no Python twin.
 */

static PyTypeObject *SlotRefType, *LeaseType, *BorrowedType;
static Py_ssize_t off_slot_ref = -1, off_slot_capacity = -1, off_cache_pool = -1,
                  off_cache_cls = -1;
static Py_ssize_t notice_batch = 64;
static PyObject *one, *zero; /* the ints 1 and 0 */
static PyObject *s_segments, *s_tickets, *s_slot_size, *s_header, *s_tickets_on, *s_client_id,
    *s_lock, *s_closed, *s_broken, *s_sock, *s_pid, *s_notices, *s_claims, *s_caches,
    *s_min_shift, *s_on_notice, *s_watch, *s_hand_off, *s_flush_notices, *s_acquire,
    *s_instance, *s_lent, *s_borrowed, *s_reduce_slow, *s_meter, *s_conn;
/* What a pickled Lease calls when unpickled: client._attach_anywhere, set by
 * configure_pickling(). (A Python function: pickle names it faster than a
 * built-in one, and its fast path is Pool._take, in C.) */
static PyObject *attach_fn;

/* The ticket word's encodings, bit for bit those of shmpool/ticket.py (the
 * layout is drawn there); tests/test_ticket_word.py holds them to it. */

/* ticket.ticket_word: the token mixed with the handle's generation. */
static uint64_t
ticket_word(uint64_t token, uint64_t generation)
{
    return (token ^ (generation * 0x9E3779B97F4A7C15ULL)) & 0x3FFFFFFFFFFFFFFFULL;
}

/* ticket.seal_token: the token a Handle carries, sealed with the handle's
 * length, capacity and readers (each times an odd constant, XORed in); its
 * own inverse, so the same call unseals a handle's token. A receiver that
 * reads a changed field unseals a token that no ticket word and no record
 * holds. */
static uint64_t
seal_token(uint64_t token, uint64_t length, uint64_t capacity, uint64_t readers)
{
    return (token ^ (length * 0xBF58476D1CE4E5B9ULL) ^ (capacity * 0x94D049BB133111EBULL) ^
            (readers * 0xFF51AFD7ED558CCDULL)) &
           0x3FFFFFFFFFFFFFFFULL;
}

/* ticket.LENT: the bit of a ticket word that a lender published. */
#define LENT (1ULL << 62)

/* ticket.returned_word: bit 63 and the generation's low 31 bits (client 0). */
static uint64_t
returned_word(uint64_t generation)
{
    return (1ULL << 63) | ((generation & 0x7FFFFFFFULL) << 32);
}

/* ticket.claim_word: returned_word with the claimer's client id. */
static uint64_t
claim_word(uint64_t client_id, uint64_t generation)
{
    return returned_word(generation) | (client_id & 0xFFFFFFFFULL);
}

/* ticket.lent_word: a lender's ticket. */
static uint64_t
lent_word(uint64_t token, uint64_t generation)
{
    return ticket_word(token, generation) | LENT;
}

/* ticket.is_returned: a claim by client 0. */
static int
is_returned(uint64_t word)
{
    return (word >> 63) && !(word & 0xFFFFFFFFULL);
}

/* ticket.word_low31: the generation's low 31 bits in a claim or returned word. */
static uint64_t
word_low31(uint64_t word)
{
    return (word >> 32) & 0x7FFFFFFFULL;
}

/* ticket.generation_at_least: the least generation >= floor with these low 31 bits. */
static uint64_t
generation_at_least(uint64_t low31, uint64_t floor)
{
    return floor + ((low31 - floor) & 0x7FFFFFFFULL);
}

#define NOTICE_DETACHED 0
#define NOTICE_CLAIMED 1
#define NOTICE_WORDS 5

/* Connection and Lending. The handoff's C paths get a Pool's connection
 * (client.Connection) and its lending (lending.Lending) as explicit
 * arguments and read their attributes by name, like Python code: a renamed
 * attribute is an AttributeError in the tests, never a wrong read. Named
 * here: conn.lock, sock, pid, closed, broken, segments, notices, claims,
 * client_id, tickets_on, instance, flush_notices() and on_notice();
 * lending.pool, borrowed, lent, caches, meter, min_shift and watch(). (By
 * offset these reads were 0.5 us faster per handoff: see docs/benchmarks.md.) */
#define get_attr PyObject_GetAttr

/* getattr(obj, name) as a C integer; -1 with an exception on failure. */
static int
attr_ssize(PyObject *obj, PyObject *name, Py_ssize_t *out)
{
    PyObject *v = get_attr(obj, name);
    if (v == NULL)
        return -1;
    *out = PyLong_AsSsize_t(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* 1 if getattr(obj, name) is true, 0 if false, -1 on error. */
static int
attr_true(PyObject *obj, PyObject *name)
{
    PyObject *v = get_attr(obj, name);
    if (v == NULL)
        return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* 1 if getattr(obj, name) is None, 0 if not, -1 on error. */
static int
attr_none(PyObject *obj, PyObject *name)
{
    PyObject *v = get_attr(obj, name);
    if (v == NULL)
        return -1;
    int r = v == Py_None;
    Py_DECREF(v);
    return r;
}

/* This process's id: getpid() is a system call (0.15 µs here), and fork()
 * resets it in the child (the pthread_atfork handler set at import). */
static pid_t this_pid;
/* fresh_token()'s batch of random tokens, and how many are left in it */
#define TOKEN_BATCH 32
static uint64_t token_batch[TOKEN_BATCH];
static int tokens_left = 0;

static void
reset_pid(void)
{
    this_pid = getpid();
    tokens_left = 0; /* after a fork: the parent's batch is the parent's */
}

/* The connection is this process's and usable (its lock held):
 * 1 yes, 0 no (the Python path reconnects or raises), -1 error. */
static int
conn_live(PyObject *conn)
{
    int r = attr_true(conn, s_closed);
    if (r != 0)
        return r < 0 ? -1 : 0;
    if ((r = attr_none(conn, s_broken)) != 1)
        return r;
    if ((r = attr_none(conn, s_sock)) != 0)
        return r < 0 ? -1 : 0;
    Py_ssize_t pid;
    if (attr_ssize(conn, s_pid, &pid) < 0)
        return -1;
    return pid == (Py_ssize_t)this_pid;
}

static int
lock_call(PyObject *lock, PyObject *name)
{
    PyObject *r = PyObject_CallMethodNoArgs(lock, name);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* Release the pool's lock, keeping an exception already raised: -1 if the
 * release itself failed. */
static int
unlock(PyObject *lock)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    int r = lock_call(lock, s_release);
    if (et != NULL)
        PyErr_Restore(et, ev, tb);
    return r;
}

/* A new `type` (SlotRef, a tuple subclass) of the three given fields. */
static PyObject *
new_ref(PyTypeObject *type, PyObject *segment, PyObject *index, PyObject *generation)
{
    PyObject *ref = type->tp_alloc(type, 3);
    if (ref != NULL) {
        PyTuple_SET_ITEM(ref, 0, Py_NewRef(segment));
        PyTuple_SET_ITEM(ref, 1, Py_NewRef(index));
        PyTuple_SET_ITEM(ref, 2, Py_NewRef(generation));
    }
    return ref;
}

/* CAS a slot's ticket word: 1 swapped, 0 not, -1 error. */
static int
ticket_cas(PyObject *tickets, Py_ssize_t index, uint64_t expected, uint64_t desired)
{
    Py_buffer view;
    uint64_t *word = word_at(tickets, 8 * index, &view);
    if (word == NULL)
        return -1;
    int ok = __atomic_compare_exchange_n(word, &expected, desired, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE);
    PyBuffer_Release(&view);
    return ok;
}

/* Connection.note for a notice the ticket word backs (lock held). */
static int
queue_notice(PyObject *conn, int kind, PyObject *segment, PyObject *index, PyObject *generation,
             PyObject *token)
{
    PyObject *notices = get_attr(conn, s_notices);
    if (notices == NULL)
        return -1;
    if (!PyList_CheckExact(notices)) {
        Py_DECREF(notices);
        PyErr_SetString(PyExc_TypeError, "Connection.notices must be a list");
        return -1;
    }
    PyObject *k = PyLong_FromLong(kind);
    int failed = k == NULL || PyList_Append(notices, k) < 0 || PyList_Append(notices, segment) < 0 ||
                 PyList_Append(notices, index) < 0 || PyList_Append(notices, generation) < 0 ||
                 PyList_Append(notices, token) < 0;
    Py_XDECREF(k);
    Py_ssize_t queued = PyList_GET_SIZE(notices);
    Py_DECREF(notices);
    if (failed)
        return -1;
    PyObject *claims = get_attr(conn, s_claims);
    if (claims == NULL)
        return -1;
    PyObject *key = PyTuple_Pack(2, segment, index);
    int flush = 0;
    if (key == NULL)
        failed = 1;
    else if (kind == NOTICE_CLAIMED)
        failed = PySet_Add(claims, key) < 0;
    else if (PySet_GET_SIZE(claims)) { /* handing on a slot whose claim is queued */
        flush = PySet_Contains(claims, key);
        failed = flush < 0;
    }
    Py_XDECREF(key);
    Py_DECREF(claims);
    if (failed)
        return -1;
    PyObject *r = NULL;
    if (flush || queued >= notice_batch * NOTICE_WORDS)
        r = PyObject_CallMethodNoArgs(conn, s_flush_notices);
    else if (queued == NOTICE_WORDS)
        r = PyObject_CallMethodNoArgs(conn, s_on_notice); /* the janitor sends them */
    else
        return 0;
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* A new _Slot(ref, view, home) (capacity = len(view)), members set directly. */
static PyObject *
new_slot(PyObject *ref, PyObject *view, Py_ssize_t capacity, PyObject *home)
{
    PyObject *cap = PyLong_FromSsize_t(capacity);
    if (cap == NULL)
        return NULL;
    PyObject *slot = SlotType->tp_alloc(SlotType, 0);
    if (slot == NULL) {
        Py_DECREF(cap);
        return NULL;
    }
    char *base = (char *)slot;
    *(PyObject **)(base + off_slot_ref) = Py_NewRef(ref);
    *(PyObject **)(base + off_slot_view) = Py_NewRef(view);
    *(PyObject **)(base + off_slot_capacity) = cap;
    *(PyObject **)(base + off_slot_home) = Py_NewRef(home);
    return slot;
}

/* An exact int as a Py_ssize_t >= 0; -1 (no exception) if it is not one. */
static Py_ssize_t
natural(PyObject *v)
{
    if (!PyLong_CheckExact(v))
        return -1;
    Py_ssize_t n = PyLong_AsSsize_t(v);
    if (n == -1 && PyErr_Occurred())
        PyErr_Clear();
    return n < 0 ? -1 : n;
}

/* The slot of a segment (its _Segment), checked against the segment's size:
 * (tickets, view, header); 0 if it does not apply, -1 on error. */
static int
segment_of(PyObject *conn, PyObject *segment, Py_ssize_t index, Py_ssize_t capacity,
           PyObject **tickets, PyObject **view, Py_ssize_t *offset)
{
    PyObject *segments = get_attr(conn, s_segments);
    if (segments == NULL)
        return -1;
    if (!PyDict_CheckExact(segments)) {
        Py_DECREF(segments);
        return 0;
    }
    PyObject *seg = PyDict_GetItemWithError(segments, segment);
    Py_XINCREF(seg);
    Py_DECREF(segments);
    if (seg == NULL)
        return PyErr_Occurred() ? -1 : 0;
    Py_ssize_t slot_size, header;
    int r = -1;
    *tickets = *view = NULL;
    if (attr_ssize(seg, s_slot_size, &slot_size) < 0 || attr_ssize(seg, s_header, &header) < 0)
        goto done;
    r = 0;
    if (slot_size != capacity || capacity <= 0 || index > header / 8 - 1)
        goto done;
    if ((*tickets = get_attr(seg, s_tickets)) == NULL ||
        (*view = get_attr(seg, s_view)) == NULL) {
        r = -1;
        goto done;
    }
    Py_ssize_t length = PyObject_Length(*view);
    if (length < 0) {
        r = -1;
        goto done;
    }
    if (*tickets != Py_None && length - header >= capacity &&
        index <= (length - header - capacity) / capacity) {
        *offset = header + index * capacity;
        r = 1;
    }
done:
    Py_DECREF(seg);
    if (r != 1) {
        Py_CLEAR(*tickets);
        Py_CLEAR(*view);
    }
    return r;
}

static PyObject *take_impl(PyObject *conn, PyObject *lending, PyObject *fields);

static PyObject *
take(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyTuple_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "take(conn, lending, fields: tuple)");
        return NULL;
    }
    return take_impl(args[0], args[1], args[2]);
}

/* Lending.take: see take() in the module's methods. */
static PyObject *
take_impl(PyObject *conn, PyObject *lending, PyObject *fields)
{
    if (PyTuple_GET_SIZE(fields) != 8 || LeaseType == NULL)
        Py_RETURN_NONE;
    PyObject *segment = PyTuple_GET_ITEM(fields, 1), *index = PyTuple_GET_ITEM(fields, 2),
             *generation = PyTuple_GET_ITEM(fields, 3), *token = PyTuple_GET_ITEM(fields, 4);
    Py_ssize_t idx = natural(index), length = natural(PyTuple_GET_ITEM(fields, 5)),
               capacity = natural(PyTuple_GET_ITEM(fields, 6)),
               readers = natural(PyTuple_GET_ITEM(fields, 7));
    if (!PyLong_CheckExact(segment) || natural(generation) < 0 || !PyLong_CheckExact(token) ||
        idx < 0 || length < 0 || capacity <= 0 || length > capacity || readers != 0)
        Py_RETURN_NONE;
    unsigned long long sealed = PyLong_AsUnsignedLongLong(token);
    if (sealed == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    /* the handoff's token: a changed length or capacity gives another, which the word lacks */
    uint64_t tok = seal_token(sealed, (uint64_t)length, (uint64_t)capacity, 0);
    unsigned long long gen = PyLong_AsUnsignedLongLongMask(generation);
    int on = attr_true(conn, s_tickets_on);
    if (on <= 0)
        return on < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *tickets = NULL, *view = NULL;
    Py_ssize_t offset = 0, client_id, min_shift;
    int found = segment_of(conn, segment, idx, capacity, &tickets, &view, &offset);
    if (found <= 0)
        return found < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *lock = NULL, *ref = NULL, *home = NULL, *meter = NULL, *result = NULL;
    int lent = 0; /* 1: we claimed it from its lender (undone if the Lease cannot be made) */
    uint64_t claimed = 0;
    if (attr_ssize(conn, s_client_id, &client_id) < 0 ||
        attr_ssize(lending, s_min_shift, &min_shift) < 0)
        goto done;
    claimed = claim_word((uint64_t)client_id, gen);
    if ((lock = get_attr(conn, s_lock)) == NULL || lock_call(lock, s_acquire) < 0) {
        Py_CLEAR(lock);
        goto done;
    }
    /* the lock is held from here to the end of this block */
    int ok = conn_live(conn);
    if (ok > 0) { /* lent by its holder (the common case), or in the manager's keeping */
        lent = ok = ticket_cas(tickets, idx, lent_word(tok, gen), claimed);
        if (ok == 0)
            ok = ticket_cas(tickets, idx, ticket_word(tok, gen), claimed);
    }
    if (ok > 0) {
        ref = new_ref(SlotRefType, segment, index, generation);
        if (ref == NULL)
            ok = -1;
        else if (lent > 0) { /* it goes back to its lender on release: Lending.borrowed */
            if ((home = get_attr(lending, s_borrowed)) == NULL)
                ok = -1;
        }
        else { /* in the manager's keeping: the notice names the handoff's token */
            PyObject *handoff = PyLong_FromUnsignedLongLong(tok);
            if (handoff == NULL ||
                queue_notice(conn, NOTICE_CLAIMED, segment, index, generation, handoff) < 0)
                ok = -1;
            Py_XDECREF(handoff);
        }
    }
    if (ok > 0) { /* the meter of this connection, as its caches are */
        meter = get_attr(lending, s_meter);
        if (meter == NULL)
            ok = -1;
        else if (!Py_IS_TYPE(meter, &MeterType)) {
            PyErr_SetString(PyExc_TypeError, "Lending.meter must be a Meter");
            ok = -1;
        }
    }
    if (ok > 0 && home == NULL) {
        PyObject *caches = get_attr(lending, s_caches);
        int bits = 8 * (int)sizeof(unsigned long long) - __builtin_clzll((unsigned long long)capacity);
        Py_ssize_t cls = bits - 1 - min_shift;
        home = caches ? PySequence_GetItem(caches, cls > 0 ? cls : 0) : NULL;
        Py_XDECREF(caches);
        if (home == NULL)
            ok = -1;
    }
    if (unlock(lock) < 0 || ok < 0)
        goto done;
    if (ok == 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *whole = PySequence_GetSlice(view, offset, offset + capacity);
    if (whole == NULL)
        goto done;
    PyObject *slot = new_slot(ref, whole, capacity, home);
    Py_DECREF(whole);
    if (slot == NULL)
        goto done;
    result = lease_new_raw(LeaseType, slot, length < capacity ? length : capacity,
                           (MeterObject *)meter);
    Py_DECREF(slot);
done:
    if (result == NULL && lent > 0) { /* no Lease: the slot stays lent, for its handle */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (ticket_cas(tickets, idx, claimed, lent_word(tok, gen)) < 0)
            PyErr_Clear();
        PyErr_Restore(et, ev, tb);
    }
    Py_XDECREF(lock);
    Py_XDECREF(ref);
    Py_XDECREF(home);
    Py_XDECREF(meter);
    Py_DECREF(tickets);
    Py_DECREF(view);
    return result;
}

static PyObject *hand_off_impl(PyObject *conn, PyObject *lending, LeaseObject *lease);

static PyObject *
hand_off(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyObject_TypeCheck(args[2], &LeaseBaseType)) {
        PyErr_SetString(PyExc_TypeError, "hand_off(conn, lending, lease: Lease)");
        return NULL;
    }
    return hand_off_impl(args[0], args[1], (LeaseObject *)args[2]);
}

/* The token of a slot lent by pickling: 62 bits (61 random, the lowest set
 * so that it is never 0) from os.urandom, drawn 32 at a time (os.urandom
 * knows every system's source and its fallbacks). Only the ticket word it
 * goes into and the handle that carries it ever hold it: a borrower and the
 * manager compare a lent slot's word, never a key (ticket.token_maker's
 * keyed hash is for handoffs the manager books from notices). A fork drops
 * the batch, so a child never repeats its parent's tokens. os.urandom may
 * let other threads run; each token is taken, and its place cleared, with
 * the GIL held, so two callers never get the same one. 0 with an exception
 * on error. */
static PyObject *urandom; /* os.urandom */

static uint64_t
fresh_token(void)
{
    if (tokens_left == 0) {
        PyObject *fresh = PyObject_CallFunction(urandom, "n", (Py_ssize_t)sizeof token_batch);
        if (fresh == NULL)
            return 0;
        if (!PyBytes_Check(fresh) || PyBytes_GET_SIZE(fresh) != (Py_ssize_t)sizeof token_batch) {
            Py_DECREF(fresh);
            PyErr_SetString(PyExc_ValueError, "os.urandom gave the wrong number of bytes");
            return 0;
        }
        memcpy(token_batch, PyBytes_AS_STRING(fresh), sizeof token_batch);
        Py_DECREF(fresh);
        tokens_left = TOKEN_BATCH;
    }
    uint64_t token = token_batch[--tokens_left];
    token_batch[tokens_left] = 0;
    return (token & 0x3FFFFFFFFFFFFFFFULL) | 1;
}

/* Lending.hand_off: see hand_off() in the module's methods. */
static PyObject *
hand_off_impl(PyObject *conn, PyObject *lending, LeaseObject *lease)
{
    if (lease->view == NULL || lease->slot == NULL || Py_TYPE(lease->slot) != SlotType)
        Py_RETURN_NONE;
    char *slot = (char *)lease->slot;
    PyObject *home = *(PyObject **)(slot + off_slot_home);
    PyObject *ref = *(PyObject **)(slot + off_slot_ref);
    PyObject *capacity = *(PyObject **)(slot + off_slot_capacity);
    if (home == NULL || ref == NULL || capacity == NULL || Py_TYPE(home) != CacheType ||
        !PyTuple_Check(ref) || PyTuple_GET_SIZE(ref) != 3)
        Py_RETURN_NONE;
    PyObject *owner = get_attr(lending, s_pool); /* the pool whose caches lending lends from */
    if (owner == NULL)
        return NULL;
    Py_DECREF(owner); /* compared by address only */
    if (*(PyObject **)((char *)home + off_cache_pool) != owner)
        Py_RETURN_NONE;
    PyObject *segment = PyTuple_GET_ITEM(ref, 0), *index = PyTuple_GET_ITEM(ref, 1),
             *generation = PyTuple_GET_ITEM(ref, 2);
    Py_ssize_t idx = natural(index), cap = natural(capacity);
    if (idx < 0 || cap <= 0 || !PyLong_CheckExact(generation))
        Py_RETURN_NONE;
    int on = attr_true(conn, s_tickets_on);
    if (on <= 0)
        return on < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *tickets = NULL, *view = NULL, *lock = NULL, *next = NULL;
    PyObject *result = NULL;
    Py_ssize_t offset;
    int found = segment_of(conn, segment, idx, cap, &tickets, &view, &offset);
    if (found <= 0)
        return found < 0 ? NULL : Py_NewRef(Py_None);
    Py_ssize_t length = PyObject_Length(lease->view);
    if (length < 0 || (lock = get_attr(conn, s_lock)) == NULL)
        goto done;
    if (lock_call(lock, s_acquire) < 0)
        goto done;
    /* the lock is held from here to the end of this block */
    int ok = conn_live(conn);
    if (ok > 0) { /* the lease is of this connection's caches: caches[home.cls] is home */
        PyObject *caches = get_attr(lending, s_caches);
        PyObject *cls = *(PyObject **)((char *)home + off_cache_cls);
        PyObject *mine = caches && cls ? PyObject_GetItem(caches, cls) : NULL;
        if (mine == NULL)
            ok = -1;
        else if (mine != home)
            ok = 0;
        Py_XDECREF(mine);
        Py_XDECREF(caches);
    }
    uint64_t word = 0, tok = 0;
    if (ok > 0) {
        next = PyNumber_Add(generation, one);
        tok = next ? fresh_token() : 0;
        if (tok == 0)
            ok = -1;
        else {
            word = lent_word(tok, PyLong_AsUnsignedLongLongMask(generation) + 1);
            ok = ticket_cas(tickets, idx, 0, word);
        }
        if (ok > 0) {
            /* The lease closes here, once: another thread may have released it
             * meanwhile (the token's calls can switch threads). Nobody has the
             * handle yet, so the word goes back; the Python path then raises. */
            int closed = lease_close_view(lease);
            if (closed <= 0) {
                ticket_cas(tickets, idx, word, 0);
                ok = closed < 0 ? -1 : 0;
            }
        }
    }
    if (ok > 0) {
        PyObject *instance = get_attr(conn, s_instance);
        PyObject *size = instance ? PyLong_FromSsize_t(length) : NULL;
        /* the handle carries the token sealed with its length and capacity */
        PyObject *sealed = size ? PyLong_FromUnsignedLongLong(seal_token(
                                      tok, (uint64_t)length, (uint64_t)cap, 0))
                                : NULL;
        result = sealed ? PyTuple_New(8) : NULL; /* the Handle's fields, in order */
        if (result != NULL) {
            PyObject *items[8] = {instance, segment, index, next, sealed, size, capacity, zero};
            for (int i = 0; i < 8; i++)
                PyTuple_SET_ITEM(result, i, Py_NewRef(items[i]));
        }
        Py_XDECREF(sealed);
        Py_XDECREF(size);
        Py_XDECREF(instance);
        PyObject *lent = result ? get_attr(lending, s_lent) : NULL;
        int first = 0; /* the only slot lent: the janitor must be there to watch it */
        if (lent == NULL || !PyList_CheckExact(lent) ||
            PyList_Append(lent, (PyObject *)slot) < 0) { /* the lender watches its word */
            if (lent != NULL && !PyList_CheckExact(lent) && !PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "Lending.lent must be a list");
            Py_CLEAR(result);
            ok = -1;
            if (ticket_cas(tickets, idx, word, 0) > 0) /* not lent after all: back in the cache */
                PyList_Append(home, (PyObject *)slot);
        }
        else
            first = PyList_GET_SIZE(lent) == 1;
        Py_XDECREF(lent);
        if (ok > 0 && first) { /* the janitor takes lent slots back, and expires their tickets */
            PyObject *r = PyObject_CallMethodNoArgs(lending, s_watch);
            if (r == NULL) {
                Py_CLEAR(result); /* lent, and watched: only the handle is lost */
                ok = -1;
            }
            Py_XDECREF(r);
        }
    }
    if (unlock(lock) < 0)
        Py_CLEAR(result);
    else if (ok == 0)
        result = Py_NewRef(Py_None);
done:
    Py_XDECREF(lock);
    Py_XDECREF(next);
    Py_DECREF(tickets);
    Py_DECREF(view);
    return result;
}

/* Pool._granted's loop: a _Slot for each granted SlotRef, over its segment's
 * mapping. None if a slot does not lie inside a segment mapped here (the
 * Python loop then raises, saying which). */
static PyObject *
carve(PyObject *module, PyObject *args)
{
    PyObject *segments, *home, *refs;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "O!nOO!", &PyDict_Type, &segments, &size, &home, &PyTuple_Type,
                          &refs))
        return NULL;
    if (SlotType == NULL || off_slot_ref < 0 || size <= 0)
        Py_RETURN_NONE;
    Py_ssize_t n = PyTuple_GET_SIZE(refs);
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    PyObject *seg = NULL, *view = NULL, *last = NULL; /* the segment of the previous slot */
    Py_ssize_t header = 0, length = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *ref = PyTuple_GET_ITEM(refs, i);
        if (!PyTuple_Check(ref) || PyTuple_GET_SIZE(ref) != 3)
            goto none;
        PyObject *segment = PyTuple_GET_ITEM(ref, 0);
        Py_ssize_t index = natural(PyTuple_GET_ITEM(ref, 1));
        if (index < 0)
            goto none;
        if (last == NULL || PyObject_RichCompareBool(segment, last, Py_EQ) != 1) {
            Py_CLEAR(view);
            if (PyErr_Occurred())
                goto fail;
            seg = PyDict_GetItemWithError(segments, segment); /* borrowed */
            if (seg == NULL) {
                if (PyErr_Occurred())
                    goto fail;
                goto none;
            }
            if (attr_ssize(seg, s_header, &header) < 0 || (view = get_attr(seg, s_view)) == NULL ||
                (length = PyObject_Length(view)) < 0)
                goto fail;
            last = segment;
        }
        if (length - header < size || index > (length - header - size) / size)
            goto none;
        Py_ssize_t offset = header + index * size;
        PyObject *whole = PySequence_GetSlice(view, offset, offset + size);
        if (whole == NULL)
            goto fail;
        PyObject *slot = new_slot(ref, whole, size, home);
        Py_DECREF(whole);
        if (slot == NULL || PyList_Append(out, slot) < 0) {
            Py_XDECREF(slot);
            goto fail;
        }
        Py_DECREF(slot);
    }
    Py_XDECREF(view);
    return out;
none:
    Py_XDECREF(view);
    Py_DECREF(out);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(view);
    Py_DECREF(out);
    return NULL;
}

/* protocol._slots for the common case: a list (or tuple) of [segment, index,
 * generation] lists (or SlotRefs) of exact ints in 0..2**63-1, as a tuple of
 * `type` (SlotRef). None if anything is otherwise: the Python loop then
 * raises, saying what. */
static PyObject *
slot_refs(PyObject *module, PyObject *args)
{
    PyObject *value, *type;
    if (!PyArg_ParseTuple(args, "OO!", &value, &PyType_Type, &type))
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "slot_refs(value, SlotRef): SlotRef must be a tuple type");
        return NULL;
    }
    if (!PyList_CheckExact(value) && !PyTuple_CheckExact(value))
        Py_RETURN_NONE;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(value);
    PyObject **items = PySequence_Fast_ITEMS(value);
    PyObject *out = PyTuple_New(n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = items[i];
        PyObject **fields;
        if (PyList_CheckExact(v) && PyList_GET_SIZE(v) == 3)
            fields = ((PyListObject *)v)->ob_item;
        else if (Py_TYPE(v) == (PyTypeObject *)type && PyTuple_GET_SIZE(v) == 3)
            fields = ((PyTupleObject *)v)->ob_item;
        else
            goto none;
        for (int k = 0; k < 3; k++) {
            int overflow;
            if (!PyLong_CheckExact(fields[k]))
                goto none;
            long long x = PyLong_AsLongLongAndOverflow(fields[k], &overflow);
            if (overflow || x < 0) {
                PyErr_Clear();
                goto none;
            }
        }
        PyObject *ref = new_ref((PyTypeObject *)type, fields[0], fields[1], fields[2]);
        if (ref == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, ref);
    }
    return out;
none:
    Py_DECREF(out);
    Py_RETURN_NONE;
}

/* find_words(buffer, count, mask, value): the indices i < count of the
 * 64-bit words w of buffer with (w & mask) == value, read atomically. */
static PyObject *
find_words(PyObject *module, PyObject *args)
{
    PyObject *obj;
    Py_ssize_t count;
    unsigned long long mask, value;
    if (!PyArg_ParseTuple(args, "OnKK", &obj, &count, &mask, &value))
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (count < 0 || count > view.len / 8 || ((uintptr_t)view.buf) % 8) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "count out of range, or the buffer is not aligned");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    const uint64_t *words = (const uint64_t *)view.buf;
    for (Py_ssize_t i = 0; out != NULL && i < count; i++) {
        if ((__atomic_load_n(&words[i], __ATOMIC_ACQUIRE) & mask) != value)
            continue;
        PyObject *n = PyLong_FromSsize_t(i);
        if (n == NULL || PyList_Append(out, n) < 0)
            Py_CLEAR(out);
        Py_XDECREF(n);
    }
    PyBuffer_Release(&view);
    return out;
}

/* The _Segment of `segment` in the pool, if its ticket words cover slot
 * `index`: a new reference to its tickets buffer; NULL with no exception if
 * not, NULL with one on error. */
static PyObject *
tickets_of(PyObject *segments, PyObject *segment, Py_ssize_t index)
{
    PyObject *seg = PyDict_GetItemWithError(segments, segment);
    if (seg == NULL)
        return NULL;
    Py_ssize_t header;
    Py_INCREF(seg);
    PyObject *tickets = NULL;
    if (attr_ssize(seg, s_header, &header) == 0 && index >= 0 && index < header / 8) {
        tickets = get_attr(seg, s_tickets);
        if (tickets == Py_None)
            Py_CLEAR(tickets);
    }
    Py_DECREF(seg);
    return tickets;
}

/* The ticket word of slot `index` in `tickets`: 1 read, -1 error. */
static int
ticket_load(PyObject *tickets, Py_ssize_t index, uint64_t *out)
{
    Py_buffer view;
    uint64_t *word = word_at(tickets, 8 * index, &view);
    if (word == NULL)
        return -1;
    *out = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    PyBuffer_Release(&view);
    return 1;
}

/* Pool._give_back's common case, from Lease.release: a slot lent to this
 * process's live connection goes back to its lender (claim -> returned word).
 * 1 done, 0 not this case (the Python path decides), -1 error. */
static int
give_back(PyObject *home, PyObject *slot)
{
    if (BorrowedType == NULL || Py_TYPE(home) != BorrowedType || Py_TYPE(slot) != SlotType)
        return 0;
    PyObject *lending = PyObject_GetAttr(home, s_pool); /* a _Borrowed's is its Lending */
    if (lending == NULL)
        return -1;
    PyObject *mine = NULL, *conn = NULL, *segments = NULL, *tickets = NULL;
    int r = -1;
    Py_ssize_t pid, client_id;
    if ((mine = get_attr(lending, s_borrowed)) == NULL || (conn = get_attr(lending, s_conn)) == NULL)
        goto done;
    r = 0;
    if (mine != home)
        goto done;
    r = -1;
    int on = attr_true(conn, s_tickets_on), closed = attr_true(conn, s_closed);
    if (on < 0 || closed < 0 || attr_ssize(conn, s_pid, &pid) < 0 ||
        attr_ssize(conn, s_client_id, &client_id) < 0)
        goto done;
    r = 0;
    if (!on || closed || pid != (Py_ssize_t)this_pid)
        goto done;
    PyObject *ref = *(PyObject **)((char *)slot + off_slot_ref);
    if (ref == NULL || !PyTuple_Check(ref) || PyTuple_GET_SIZE(ref) != 3)
        goto done;
    Py_ssize_t idx = natural(PyTuple_GET_ITEM(ref, 1));
    PyObject *generation = PyTuple_GET_ITEM(ref, 2);
    if (idx < 0 || !PyLong_CheckExact(generation))
        goto done;
    if ((segments = get_attr(conn, s_segments)) == NULL) {
        r = -1;
        goto done;
    }
    if (!PyDict_CheckExact(segments))
        goto done;
    tickets = tickets_of(segments, PyTuple_GET_ITEM(ref, 0), idx);
    if (tickets == NULL) {
        r = PyErr_Occurred() ? -1 : 0;
        goto done;
    }
    uint64_t gen = PyLong_AsUnsignedLongLongMask(generation);
    r = ticket_cas(tickets, idx, claim_word((uint64_t)client_id, gen),
                   returned_word(gen)); /* 0: the Python path decides */
done:
    Py_DECREF(lending);
    Py_XDECREF(mine);
    Py_XDECREF(conn);
    Py_XDECREF(segments);
    Py_XDECREF(tickets);
    return r;
}

/* reclaim(pool): Pool._reclaim_lent without the expiry of tickets (the
 * janitor's Python pass does that): lent slots whose word says returned go
 * back to their caches, those at 0 are dropped, the rest stay lent. Returns
 * how many came back. Lock held. */
static PyObject *
reclaim(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "reclaim(conn, lending)");
        return NULL;
    }
    PyObject *conn = args[0], *lending = args[1];
    PyObject *lent = get_attr(lending, s_lent);
    if (lent == NULL)
        return NULL;
    PyObject *keep = NULL, *segments = NULL, *caches = NULL, *result = NULL;
    Py_ssize_t back = 0, i = 0;
    if (!PyList_CheckExact(lent) || SlotRefType == NULL) {
        PyErr_SetString(PyExc_TypeError, "Lending.lent must be a list (and configured)");
        goto done;
    }
    if ((keep = PyList_New(0)) == NULL || (segments = get_attr(conn, s_segments)) == NULL ||
        (caches = get_attr(lending, s_caches)) == NULL)
        goto done;
    if (!PyDict_CheckExact(segments)) {
        PyErr_SetString(PyExc_TypeError, "Connection.segments must be a dict");
        goto done;
    }
    for (; i < PyList_GET_SIZE(lent); i++) {
        PyObject *slot = PyList_GET_ITEM(lent, i);
        if (Py_TYPE(slot) != SlotType)
            continue;
        PyObject *ref = *(PyObject **)((char *)slot + off_slot_ref);
        PyObject *home = *(PyObject **)((char *)slot + off_slot_home);
        if (ref == NULL || home == NULL || Py_TYPE(home) != CacheType || !PyTuple_Check(ref) ||
            PyTuple_GET_SIZE(ref) != 3)
            continue;
        PyObject *cls = *(PyObject **)((char *)home + off_cache_cls);
        PyObject *current = cls ? PyObject_GetItem(caches, cls) : NULL;
        if (current == NULL)
            goto done;
        Py_DECREF(current);
        if (current != home)
            continue; /* lent by the connection this pool had before a reset */
        PyObject *segment = PyTuple_GET_ITEM(ref, 0), *generation = PyTuple_GET_ITEM(ref, 2);
        Py_ssize_t idx = natural(PyTuple_GET_ITEM(ref, 1));
        if (idx < 0 || !PyLong_CheckExact(generation))
            continue;
        PyObject *tickets = tickets_of(segments, segment, idx);
        if (tickets == NULL) {
            if (PyErr_Occurred())
                goto done;
            continue;
        }
        uint64_t word;
        int ok = ticket_load(tickets, idx, &word);
        if (ok > 0 && word == 0) { /* the manager took it over: no longer ours */
            Py_DECREF(tickets);
            continue;
        }
        if (ok > 0 && is_returned(word)) {
            ok = ticket_cas(tickets, idx, word, 0);
            ok = ok < 0 ? -1 : ok + 1; /* 2: swapped, 1: it moved on meanwhile */
        }
        Py_DECREF(tickets);
        if (ok < 0)
            goto done;
        if (ok == 1) { /* out still */
            if (PyList_Append(keep, slot) < 0)
                goto done;
            continue;
        }
        /* returned: the generation moves on by the hops it made */
        unsigned long long floor = PyLong_AsUnsignedLongLongMask(generation) + 1;
        PyObject *next = PyLong_FromUnsignedLongLong(generation_at_least(word_low31(word), floor));
        PyObject *fresh = next ? new_ref(SlotRefType, segment, PyTuple_GET_ITEM(ref, 1), next) : NULL;
        Py_XDECREF(next);
        if (fresh != NULL)
            Py_SETREF(*(PyObject **)((char *)slot + off_slot_ref), fresh);
        if (PyList_Append(home, slot) < 0) { /* taken back, so not lent: the cache has it or not */
            i++;
            goto done;
        }
        back++;
        if (fresh == NULL) {
            i++;
            goto done;
        }
    }
    i = PyList_GET_SIZE(lent);
    result = PyLong_FromSsize_t(back);
done:
    /* On an error, the slots not looked at stay lent (none is listed twice). */
    if (keep != NULL && lent != NULL && PyList_CheckExact(lent)) {
        PyObject *rest = PyList_GetSlice(lent, i, PyList_GET_SIZE(lent));
        if (rest == NULL || PyList_SetSlice(keep, PyList_GET_SIZE(keep), PyList_GET_SIZE(keep),
                                            rest) < 0 ||
            PyObject_SetAttr(lending, s_lent, keep) < 0)
            Py_CLEAR(result);
        Py_XDECREF(rest);
    }
    Py_DECREF(lent);
    Py_XDECREF(keep);
    Py_XDECREF(segments);
    Py_XDECREF(caches);
    return result;
}

static PyObject *
configure_pickling(PyObject *module, PyObject *fn)
{
    Py_XSETREF(attach_fn, Py_NewRef(fn));
    Py_RETURN_NONE;
}

/* Lease.__reduce__: the lease goes as its handle's fields (ownership moves
 * at pickling time), unpickled by attach_anywhere. The common case is
 * hand_off's; anything else is Lease._reduce_slow's, which raises what
 * applies. */
static PyObject *
lease_reduce(LeaseObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->view != NULL && attach_fn != NULL && self->slot != NULL &&
        Py_TYPE(self->slot) == SlotType) {
        PyObject *home = *(PyObject **)((char *)self->slot + off_slot_home);
        if (home != NULL && Py_TYPE(home) == CacheType && off_cache_pool >= 0) {
            PyObject *pool = *(PyObject **)((char *)home + off_cache_pool);
            PyObject *fields = pool ? PyObject_CallMethodOneArg(pool, s_hand_off, (PyObject *)self)
                                    : NULL; /* Pool._hand_off, which raises what applies */
            if (fields == NULL)
                return pool ? NULL : PyObject_CallMethodNoArgs((PyObject *)self, s_reduce_slow);
            PyObject *r = PyTuple_Pack(2, attach_fn, fields);
            Py_DECREF(fields);
            return r;
        }
    }
    return PyObject_CallMethodNoArgs((PyObject *)self, s_reduce_slow);
}

static PyObject *
configure_handoff(PyObject *module, PyObject *args)
{
    PyObject *slotref_type, *lease_type, *borrowed_type;
    Py_ssize_t batch;
    if (!PyArg_ParseTuple(args, "O!O!nO!", &PyType_Type, &slotref_type, &PyType_Type, &lease_type,
                          &batch, &PyType_Type, &borrowed_type))
        return NULL;
    if (SlotType == NULL || CacheType == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "configure() comes first");
        return NULL;
    }
    if (!PyType_IsSubtype((PyTypeObject *)slotref_type, &PyTuple_Type) ||
        !PyType_IsSubtype((PyTypeObject *)lease_type, &LeaseBaseType) || batch < 1) {
        PyErr_SetString(PyExc_TypeError, "configure_handoff(SlotRef, Lease, batch >= 1)");
        return NULL;
    }
    Py_ssize_t ref = member_offset(SlotType, "ref");
    Py_ssize_t capacity = ref < 0 ? -1 : member_offset(SlotType, "capacity");
    Py_ssize_t pool = capacity < 0 ? -1 : member_offset(CacheType, "pool");
    Py_ssize_t cls = pool < 0 ? -1 : member_offset(CacheType, "cls");
    if (cls < 0)
        return NULL;
    off_slot_ref = ref;
    off_slot_capacity = capacity;
    off_cache_pool = pool;
    off_cache_cls = cls;
    notice_batch = batch;
    Py_INCREF(slotref_type);
    Py_XSETREF(SlotRefType, (PyTypeObject *)slotref_type);
    Py_INCREF(lease_type);
    Py_XSETREF(LeaseType, (PyTypeObject *)lease_type);
    Py_INCREF(borrowed_type);
    Py_XSETREF(BorrowedType, (PyTypeObject *)borrowed_type);
    Py_RETURN_NONE;
}

/* seal_token(token, length, capacity, readers): ticket.seal_token, for the
 * parity tests (every argument taken modulo 2**64). */
static PyObject *
seal_token_py(PyObject *module, PyObject *args)
{
    unsigned long long token, length, capacity, readers;
    if (!PyArg_ParseTuple(args, "KKKK", &token, &length, &capacity, &readers))
        return NULL;
    return PyLong_FromUnsignedLongLong(seal_token(token, length, capacity, readers));
}

/* The ticket word's encodings above, callable for the parity tests under the
 * names of their shmpool.ticket twins (every argument taken modulo 2**64). */
#define WORD_FUNCTION_1(name)                                                  \
    static PyObject *name##_py(PyObject *module, PyObject *args)               \
    {                                                                          \
        unsigned long long a;                                                  \
        if (!PyArg_ParseTuple(args, "K", &a))                                  \
            return NULL;                                                       \
        return PyLong_FromUnsignedLongLong(name(a));                           \
    }
#define WORD_FUNCTION_2(name)                                                  \
    static PyObject *name##_py(PyObject *module, PyObject *args)               \
    {                                                                          \
        unsigned long long a, b;                                               \
        if (!PyArg_ParseTuple(args, "KK", &a, &b))                             \
            return NULL;                                                       \
        return PyLong_FromUnsignedLongLong(name(a, b));                        \
    }
WORD_FUNCTION_2(ticket_word)
WORD_FUNCTION_2(lent_word)
WORD_FUNCTION_2(claim_word)
WORD_FUNCTION_1(returned_word)
WORD_FUNCTION_1(word_low31)
WORD_FUNCTION_2(generation_at_least)

static PyObject *
is_returned_py(PyObject *module, PyObject *args)
{
    unsigned long long word;
    if (!PyArg_ParseTuple(args, "K", &word))
        return NULL;
    return PyBool_FromLong(is_returned(word));
}

/* call_soon(func): call func() in the main thread at its next bytecode
 * boundary (Py_AddPendingCall), after the C call running now returns. The
 * client starts its janitors again this way after os.fork(): from the
 * at-fork callback itself they would run while os.fork() counts the
 * process's threads, and Python 3.12+ would warn about forking with threads. */
static int
run_soon(void *arg)
{
    PyObject *func = (PyObject *)arg;
    PyObject *result = PyObject_CallNoArgs(func);
    Py_DECREF(func);
    if (result == NULL) { /* a pending call that fails would raise in whatever code runs */
        PyErr_WriteUnraisable(NULL);
        return 0;
    }
    Py_DECREF(result);
    return 0;
}

static PyObject *
call_soon(PyObject *module, PyObject *func)
{
    if (!PyCallable_Check(func)) {
        PyErr_SetString(PyExc_TypeError, "call_soon() needs a callable");
        return NULL;
    }
    Py_INCREF(func);
    if (Py_AddPendingCall(run_soon, func) < 0) {
        Py_DECREF(func);
        Py_RETURN_FALSE; /* the queue is full: the caller does it now */
    }
    Py_RETURN_TRUE;
}

static PyMethodDef module_methods[] = {
    {"make_lease", make_lease, METH_VARARGS, "make_lease(type, slot, size, meter) -> Lease"},
    {"call_soon", call_soon, METH_O,
     "call_soon(func) -> bool: func() runs in the main thread once the current call returns"},
    {"cas64", cas64, METH_VARARGS, "cas64(buffer, offset, expected, new) -> bool (atomic)"},
    {"load64", load64, METH_VARARGS, "load64(buffer, offset) -> int (atomic)"},
    {"store64", store64, METH_VARARGS, "store64(buffer, offset, value) (atomic)"},
    {"find_words", find_words, METH_VARARGS,
     "find_words(buffer, count, mask, value) -> indices of words w with w & mask == value"},
    {"configure", configure, METH_VARARGS, "configure(LeaseClosedError, _Slot, _Cache)"},
    {"configure_finalizer", configure_finalizer, METH_O,
     "configure_finalizer(fn): fn(slot, length, origin, closed) for a lease destroyed open"},
    {"configure_handoff", configure_handoff, METH_VARARGS,
     "configure_handoff(SlotRef, Lease, notice_batch, _Borrowed)"},
    {"configure_pickling", configure_pickling, METH_O,
     "configure_pickling(client._attach_anywhere): what Lease.__reduce__ names"},
    {"seal_token", seal_token_py, METH_VARARGS,
     "seal_token(token, length, capacity, readers) -> int (ticket.seal_token)"},
    {"ticket_word", ticket_word_py, METH_VARARGS,
     "ticket_word(token, generation) -> int (ticket.ticket_word)"},
    {"lent_word", lent_word_py, METH_VARARGS, "lent_word(token, generation) -> int (ticket.lent_word)"},
    {"claim_word", claim_word_py, METH_VARARGS,
     "claim_word(client_id, generation) -> int (ticket.claim_word)"},
    {"returned_word", returned_word_py, METH_VARARGS,
     "returned_word(generation) -> int (ticket.returned_word)"},
    {"is_returned", is_returned_py, METH_VARARGS, "is_returned(word) -> bool (ticket.is_returned)"},
    {"word_low31", word_low31_py, METH_VARARGS, "word_low31(word) -> int (ticket.word_low31)"},
    {"generation_at_least", generation_at_least_py, METH_VARARGS,
     "generation_at_least(low31, floor) -> int (ticket.generation_at_least)"},
    {"reclaim", (PyCFunction)(void (*)(void))reclaim, METH_FASTCALL,
     "reclaim(conn, lending) -> slots taken back (Lending.reclaim_lent, no expiry)"},
    {"carve", carve, METH_VARARGS, "carve(segments, slot_size, home, refs) -> [_Slot] or None"},
    {"slot_refs", slot_refs, METH_VARARGS, "slot_refs(value, SlotRef) -> tuple or None"},
    {"take", (PyCFunction)(void (*)(void))take, METH_FASTCALL, "take(conn, lending, fields) -> Lease or None (Lending.take)"},
    {"hand_off", (PyCFunction)(void (*)(void))hand_off, METH_FASTCALL, "hand_off(conn, lending, lease) -> fields or None (Lending.hand_off)"},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "shmpool._speedups", "shmpool's hot path in C.", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&LeaseBaseType) < 0 || PyType_Ready(&AcquirerType) < 0 ||
        PyType_Ready(&MeterType) < 0)
        return NULL;
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(s_release, "release");
    INTERN(s_home, "home");
    INTERN(s_view, "view");
    INTERN(s_append, "append");
    INTERN(s_high, "high");
    INTERN(s_pool, "pool");
    INTERN(s_trim, "_trim");
    INTERN(s_segments, "segments");
    INTERN(s_tickets, "tickets");
    INTERN(s_slot_size, "slot_size");
    INTERN(s_header, "header");
    INTERN(s_tickets_on, "tickets_on");
    INTERN(s_client_id, "client_id");
    INTERN(s_lock, "lock");
    INTERN(s_closed, "closed");
    INTERN(s_broken, "broken");
    INTERN(s_sock, "sock");
    INTERN(s_pid, "pid");
    INTERN(s_notices, "notices");
    INTERN(s_claims, "claims");
    INTERN(s_caches, "caches");
    INTERN(s_min_shift, "min_shift");
    INTERN(s_on_notice, "on_notice");
    INTERN(s_watch, "watch");
    INTERN(s_hand_off, "_hand_off");
    INTERN(s_flush_notices, "flush_notices");
    INTERN(s_acquire, "acquire");
    INTERN(s_instance, "instance");
    INTERN(s_lent, "lent");
    INTERN(s_borrowed, "borrowed");
    INTERN(s_reduce_slow, "_reduce_slow");
    INTERN(s_meter, "meter");
    INTERN(s_conn, "conn");

    if ((one = PyLong_FromLong(1)) == NULL || (zero = PyLong_FromLong(0)) == NULL)
        return NULL;
    reset_pid();
    if (pthread_atfork(NULL, NULL, reset_pid) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
        return NULL;
    }
    PyObject *os_module = PyImport_ImportModule("os");
    urandom = os_module ? PyObject_GetAttrString(os_module, "urandom") : NULL;
    Py_XDECREF(os_module);
    if (urandom == NULL)
        return NULL;
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
    Py_INCREF(&MeterType);
    if (PyModule_AddObject(m, "LeaseBase", (PyObject *)&LeaseBaseType) < 0 ||
        PyModule_AddObject(m, "Acquirer", (PyObject *)&AcquirerType) < 0 ||
        PyModule_AddObject(m, "Meter", (PyObject *)&MeterType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
