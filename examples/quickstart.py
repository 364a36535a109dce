"""The shortest useful shmpool program: an embedded manager and one lease.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import shmpool


def main() -> None:
    with shmpool.start(min_size="4KiB", max_size="64MiB", memory="256MiB") as manager:
        with manager.connect() as pool, pool.acquire(100_000) as lease:
            lease.view[:5] = b"hello"
            print(f"leased {len(lease.view)} bytes in a {lease.capacity}-byte slot")
            print(bytes(lease.view[:5]))
            stats = pool.stats()
        committed, clients = stats["committed_bytes"], len(stats["clients"])
        print(f"manager committed {committed} bytes of memory for {clients} client(s)")


if __name__ == "__main__":
    main()
