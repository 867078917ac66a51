#!/usr/bin/env python3
"""Writes a linker symbol-ordering file: the functions of BINARY that lie on pages of it in the page cache.

Run on a copy of the binary that was evicted from the page cache and then run from a file system without readahead
(bench/link-order.sh does both), so that exactly the pages the processes touched are cached. Each function that
overlaps such a page is listed (mangled, as the linker knows it), in the order of its address in BINARY.

usage: link-order.py BINARY OUTPUT
"""
import ctypes
import os
import subprocess
import sys

PAGE = 4096


def cached_pages(path):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED: mapping faults nothing in
    if addr in (None, ctypes.c_void_p(-1).value):
        sys.exit(f"mmap {path}: errno {ctypes.get_errno()}")
    vec = (ctypes.c_ubyte * ((size + PAGE - 1) // PAGE))()
    if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
        sys.exit(f"mincore {path}: errno {ctypes.get_errno()}")
    return [v & 1 for v in vec]


def load_segments(path):
    out = subprocess.run(["readelf", "-lW", path], capture_output=True, text=True, check=True).stdout
    segs = []
    for line in out.splitlines():
        f = line.split()
        if f and f[0] == "LOAD":
            segs.append((int(f[1], 16), int(f[2], 16), int(f[4], 16)))  # offset, vaddr, file size
    return segs


def main():
    binary, output = sys.argv[1], sys.argv[2]
    cached = cached_pages(binary)
    if sum(cached) > 0.9 * len(cached):
        sys.exit(f"{binary}: {sum(cached)} of {len(cached)} pages cached: was it evicted and run without readahead?")
    segs = load_segments(binary)
    nm = subprocess.run(["nm", "-S", "--defined-only", binary], capture_output=True, text=True, check=True).stdout
    touched, code, listed = [], 0, 0
    for line in nm.splitlines():
        f = line.split()
        if len(f) != 4 or f[2] not in "tTwW":
            continue
        vaddr, size, name = int(f[0], 16), int(f[1], 16), f[3]
        seg = next(((o, v) for o, v, s in segs if v <= vaddr < v + s), None)
        if seg is None or size == 0:
            continue
        start = vaddr - seg[1] + seg[0]
        code += size
        if any(cached[p] for p in range(start // PAGE, min((start + size - 1) // PAGE + 1, len(cached)))):
            touched.append((vaddr, name))
            listed += size
    touched.sort()
    seen = set()
    with open(output, "w") as out:
        for _, name in touched:
            if name not in seen:
                seen.add(name)
                out.write(name + "\n")
    print(f"{len(seen)} functions, {listed / 1e6:.2f} of {code / 1e6:.2f} MB of code "
          f"({sum(cached)} of {len(cached)} pages of the file cached)")


if __name__ == "__main__":
    main()
