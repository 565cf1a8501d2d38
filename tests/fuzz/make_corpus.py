#!/usr/bin/env python3
"""Writes the seed corpus of kvc's parser fuzzers (tests/fuzz/corpus/): valid .npy files of
each dtype and shape style (written by numpy when it is installed, else by hand), valid
config.json variants of every policy, whole trace directories for fuzz_trace_dir, and a few
malformed inputs. The files are committed; rerun this only to regenerate them."""
import io
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus")
SEP = b"\n--kvc--\n"

try:
    import numpy
except ImportError:  # hand-written v1.0 files, as numpy.save writes them
    numpy = None


def npy(shape, descr="<f4", values=None, version=1, fortran=False):
    count = 1
    for dim in shape:
        count *= dim
    if numpy is not None and descr in ("<f4", "<i4", "<f8", ">f4") and version == 1 and not fortran:
        dtype = numpy.dtype(descr)
        data = numpy.arange(count, dtype=numpy.float64) * 0.25 - 1.0 if values is None else values
        array = numpy.asarray(data, dtype=dtype).reshape(shape)
        buffer = io.BytesIO()
        numpy.save(buffer, array)
        return buffer.getvalue()
    shape_text = "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
    header = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (
        descr, "True" if fortran else "False", shape_text)
    prefix = 10 if version == 1 else 12
    header += " " * ((64 - (prefix + len(header) + 1) % 64) % 64) + "\n"
    length = struct.pack("<H", len(header)) if version == 1 else struct.pack("<I", len(header))
    size = 8 if descr.endswith("8") else 4
    data = bytes((i * 37) & 0xFF for i in range(count * size)) if values is None else values
    return b"\x93NUMPY" + bytes([version, 0]) + length + header.encode() + data


def write(kind, name, data):
    os.makedirs(os.path.join(OUT, kind), exist_ok=True)
    with open(os.path.join(OUT, kind, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def configs():
    base = {"dtype": "bf16", "q_heads": 4, "kv_heads": 2, "head_dim": 8, "rope": "rotate_half",
            "rope_theta": 10000.0, "prompt_tokens": 2}
    yield "full", dict(base, policy="full")
    yield "full_norope", dict(base, policy="full", rope="none", dtype="fp32")
    yield "dmc_checkpoint", dict(base, policy="dmc", mode="checkpoint")
    yield "dmc_paper_window", dict(base, policy="dmc", mode="paper", window=4, dtype="fp16")
    yield "h2o", dict(base, policy="h2o", heavy=2, recent=1, rope="interleaved")
    yield "tova", dict(base, policy="tova", budget=3, protect_new=True, dtype="float16")


def main():
    # .npy: each dtype, scalar / 1-d / 3-d / empty shapes, v1 and v2 headers.
    write("npy", "f4_3d.npy", npy((2, 3, 4)))
    write("npy", "f4_1d.npy", npy((5,)))
    write("npy", "f4_scalar.npy", npy(()))
    write("npy", "f4_empty.npy", npy((0, 3)))
    write("npy", "i4_2d.npy", npy((3, 2), "<i4"))
    write("npy", "f4_v2.npy", npy((2, 2), version=2))
    write("npy", "f4_v3.npy", npy((1, 2), version=3))
    write("npy", "bad_f8.npy", npy((2,), "<f8"))
    write("npy", "bad_big_endian.npy", npy((2,), ">f4"))
    write("npy", "bad_fortran.npy", npy((2, 2), fortran=True))
    write("npy", "bad_truncated.npy", npy((4, 4))[:-7])
    write("npy", "bad_magic.npy", b"\x93NUMPX\x01\x00" + npy((1,))[8:])
    write("npy", "bad_header_len.npy", b"\x93NUMPY\x01\x00\xff\xff{'descr'")
    # JSON: the configs, plus documents that exercise escapes, numbers and nesting.
    for name, config in configs():
        write("json", name + ".json", json.dumps(config, indent=2))
        write("trace_config", name + ".json", json.dumps(config))
    write("json", "escapes.json", '{"a": "\\u00e9\\ud83d\\ude00\\n\\t\\"", "b": [1, -2.5e-3, 0, 1E+2]}')
    write("json", "nested.json", "[[[[{\"x\": [true, false, null]}]]]]")
    write("json", "utf8_bom.json", b"\xef\xbb\xbf{\"k\": \"\xc3\xa9\"}")
    write("json", "bad_trailing_comma.json", '{"a": 1,}')
    write("json", "bad_lone_surrogate.json", '"\\udc00"')
    write("json", "bad_leading_zero.json", "[01]")
    write("trace_config", "bad_missing_policy.json", '{"dtype": "fp32"}')
    write("trace_config", "bad_q_heads.json",
          '{"policy": "full", "dtype": "fp32", "q_heads": 3, "kv_heads": 2, "head_dim": 8,'
          ' "rope": "none", "prompt_tokens": 0}')
    write("trace_config", "bad_window.json",
          '{"policy": "dmc", "mode": "paper", "dtype": "fp32", "q_heads": 2, "kv_heads": 2,'
          ' "head_dim": 8, "rope": "none", "prompt_tokens": 0, "window": 65}')
    # Whole traces: config, q, k, v joined by the separator (T = 3 tokens).
    for name, config in configs():
        t, hq, hkv, d = 3, config["q_heads"], config["kv_heads"], config["head_dim"]
        values = lambda n: [((i * 7) % 11 - 5) * 0.25 for i in range(n)]
        if numpy is not None:
            q = npy((t, hq, d), values=values(t * hq * d))
            k = npy((t, hkv, d), values=values(t * hkv * d))
        else:
            q = npy((t, hq, d), values=struct.pack("<%df" % (t * hq * d), *values(t * hq * d)))
            k = npy((t, hkv, d), values=struct.pack("<%df" % (t * hkv * d), *values(t * hkv * d)))
        write("trace_dir", name + ".trace", json.dumps(config).encode() + SEP + q + SEP + k + SEP + k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
