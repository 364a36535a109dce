"""Worker processes filling and checksumming buffers leased from one manager.

Each worker connects with ``shmpool.connect()`` (the address comes from
``$SHMPOOL_ADDRESS``, which ``shmpool.start()`` sets and children inherit),
then recycles buffers instead of allocating a fresh ``bytearray`` per task.

Run: python examples/multiprocessing_workers.py
"""

from __future__ import annotations

import multiprocessing as mp
import zlib

import shmpool

_pool: shmpool.Pool | None = None


def init_worker() -> None:
    global _pool
    _pool = shmpool.connect(name="example-worker")


def task(n: int) -> int:
    assert _pool is not None
    with _pool.acquire(n) as lease:
        lease.view[:] = bytes([n % 251]) * n
        return zlib.crc32(lease.view)


def main() -> None:
    with shmpool.start(memory="256MiB") as manager:
        sizes = [4096 * (1 + i % 64) for i in range(2000)]
        with mp.get_context("spawn").Pool(4, initializer=init_worker) as workers:
            crcs = workers.map(task, sizes, chunksize=50)
        expected = [zlib.crc32(bytes([n % 251]) * n) for n in sizes]
        print(f"{len(crcs)} buffers checksummed, all correct: {crcs == expected}")
        print(shmpool.format_stats(manager.stats()))


if __name__ == "__main__":
    main()
