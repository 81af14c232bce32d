"""Steady-state copy speed: a client mapping populated at map time (MAP_POPULATE, before)
vs lazily with ChunkPopulator (after), interleaved, 1 GiB segment, 4 MiB copies.

Prints (round, sweep, seconds to map, GB/s) per mode: sweep 0 touches every chunk once
(pays the populate), sweep 1 is the steady state. Needs 1 GiB free in /dev/shm. JSON in
bench/out/shm_populate.json.

    .venv/bin/python bench/shm_populate_bench.py
"""
import ctypes, json, mmap, os, time, numpy as np, _posixshmem
from pathlib import Path
from kvstore._posix_shm import ChunkPopulator, create_shm, unique_shm_name
size = 1 << 30
seg = create_shm(unique_shm_name("kvstore-copycheck"), size)
fd = _posixshmem.shm_open(seg.name, os.O_RDWR, mode=0); os.posix_fallocate(fd, 0, size)
def mapping(populate):
    m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0))
    return m, np.frombuffer(m, np.uint8).ctypes.data
src = np.ones(4 << 20, np.uint8); addr_src = src.ctypes.data
results = {"MAP_POPULATE": [], "lazy+ChunkPopulator": []}
for rnd in range(3):
    for name in results:
        t0 = time.perf_counter(); m, base = mapping(name == "MAP_POPULATE")
        pop = ChunkPopulator(base, size); map_s = time.perf_counter() - t0
        for sweep in range(2):   # first sweep touches every chunk once, second is steady state
            t = time.perf_counter()
            for off in range(0, size, 4 << 20):
                if name != "MAP_POPULATE":
                    pop.ensure(off, 4 << 20)
                ctypes.memmove(base + off, addr_src, 4 << 20)
            gbps = size / (time.perf_counter() - t) / 1e9
            results[name].append((rnd, sweep, round(map_s, 3), round(gbps, 2)))
        del pop, base; m.close()
for name, rows in results.items():
    print(name, "(round, sweep, map s, GB/s):", rows)
seg.unlink(); seg.close(); os.close(fd)
load = open("/proc/loadavg").read().split()[:3]
print("load", load)
out = Path(__file__).resolve().parent / "out" / "shm_populate.json"
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps({"load_avg": load, "rows": results}, indent=2))
