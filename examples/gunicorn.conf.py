"""gunicorn config: an embedded shmpool manager in the master, for examples/gunicorn_app.py.

Run, from the repository root (``pip install gunicorn`` first):

    gunicorn -c examples/gunicorn.conf.py

Command-line flags override what is set here, for example
``gunicorn -c examples/gunicorn.conf.py --preload -k gthread --threads 8 --max-requests 500``,
and a WSGI app given on the command line replaces ``wsgi_app``. The
manager's settings can also come from ``SHMPOOL_MEMORY``,
``SHMPOOL_MIN_SIZE`` and ``SHMPOOL_MAX_SIZE``; ``configure()`` below wins
over them. To use a manager of your own (``shmpool serve``), set
``SHMPOOL_ADDRESS`` for gunicorn: the hooks then start none.
"""

from __future__ import annotations

import os

import shmpool.gunicorn
from shmpool.gunicorn import child_exit, on_exit, on_reload, on_starting, post_fork

# The hooks gunicorn looks for by name (re-exported: gunicorn reads this module's names).
__all__ = ["child_exit", "on_exit", "on_reload", "on_starting", "post_fork"]

shmpool.gunicorn.configure(memory="256MiB", max_size="16MiB")

wsgi_app = "gunicorn_app:app"
pythonpath = os.path.dirname(os.path.abspath(__file__))  # where gunicorn_app.py is
bind = "127.0.0.1:8000"
workers = 2
