#!/usr/bin/env python3
"""Write a few valid NBD sessions as seed inputs: fuzz/corpus/<target>/seed-*. Not committed."""
import os, struct

def opt(o, data=b""):
    return b"IHAVEOPT" + struct.pack(">II", o, len(data)) + data

def name(n):
    return struct.pack(">I", len(n)) + n

def req(typ, cookie, off, ln, flags=0, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, typ, cookie, off, ln) + payload

meta = name(b"a") + struct.pack(">I", 1) + name(b"base:allocation")
reqs = (req(1, 1, 4096, 4096, 0, b"\x5a" * 4096) + req(0, 2, 0, 16384) + req(0, 3, 0, 16384, 4)
        + req(7, 4, 0, 65536) + req(7, 5, 0, 65536, 8) + req(6, 6, 0, 8192, 16 | 2) + req(4, 7, 100, 5000)
        + req(5, 8, 0, 4096) + req(3, 9, 0, 0) + req(1, 10, 1000, 513, 1, b"\x01" * 513) + req(2, 11, 0, 0))
hs = {
    "go-structured": struct.pack(">I", 3) + opt(8) + opt(10, meta) + opt(7, name(b"a") + struct.pack(">HHH", 2, 3, 1)) + reqs,
    "go-simple": struct.pack(">I", 3) + opt(3) + opt(6, name(b"b") + struct.pack(">HH", 1, 2)) + opt(7, name(b"") + struct.pack(">H", 0)) + reqs,
    "export-name": struct.pack(">I", 1) + opt(9, name(b"a") + struct.pack(">I", 0)) + opt(1, b"a") + reqs,
}
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
for target, seeds in (("nbd_handshake", hs), ("nbd_request", {"mixed-s": b"\x03" + reqs, "mixed-w": b"\x13" + reqs, "simple": b"\x00" + reqs})):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    for k, v in seeds.items():
        open(os.path.join(d, "seed-" + k), "wb").write(v)
