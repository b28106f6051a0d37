#!/usr/bin/env python3
"""PyTorch side of scripts/bench_conv_vs_torch.sh: the workloads of `benches/conv.rs`, timed.

Prints one line per workload and pass in the bench's format,
  `GFLOP/s <name> <pass> <seconds> s <GFLOP/s> GFLOP/s`,
best of --runs after one warm-up. Passes: `fwd` (forward under no_grad) and `fwd+bwd` (forward,
loss sum(y * r), backward for the input and the weight: what a training step asks of a conv).
With NNSEG_BENCH_PARTS=1 (as for benches/conv.rs) it also times `k:fwd`, `k:dx` and `k:dw`:
the forward and aten.convolution_backward with only the input / only the weight gradient.
--cpu reports process CPU time instead of wall time (with --threads 1: the kernel's own time on
a loaded machine). --threads sets torch.set_num_threads (use rayon's thread count). The instruction set follows
PyTorch's own switches: ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 force the AVX2
paths on an AVX-512 host; the header line reports what is in use.
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F


def conv_p1(x, w):
    return F.conv2d(x, w, padding=1) if x.dim() == 4 else F.conv3d(x, w, padding=1)


def conv_s2(x, w):
    return F.conv2d(x, w, padding=1, stride=2)


def conv_aniso(x, w):
    return F.conv3d(x, w, padding=(0, 1, 1))


def conv_aniso_s122(x, w):
    return F.conv3d(x, w, padding=(0, 1, 1), stride=(1, 2, 2))


def convt_k2(x, w):
    return (F.conv_transpose2d if x.dim() == 4 else F.conv_transpose3d)(x, w, stride=2)


def macs(n, cin, cout, k, out):
    return n * cin * cout * k * out


# workload fn -> (stride, padding, transposed) for aten.convolution_backward
GEOM = {conv_p1: (1, 1, False), conv_s2: (2, 1, False), conv_aniso: (1, (0, 1, 1), False),
        conv_aniso_s122: ((1, 2, 2), (0, 1, 1), False), convt_k2: (2, 0, True)}


def parts(name, x, w, r, fn, m, runs):
    """Forward, input gradient and weight gradient one by one (GFLOP/s of one pass each)."""
    s, p, tr = GEOM[fn]
    nd = x.dim() - 2
    tup = lambda v: tuple(v) if isinstance(v, tuple) else (v,) * nd
    x, w = x.detach(), w.detach()

    def bwd(mask):
        return lambda: torch.ops.aten.convolution_backward(
            r, x, w, None, tup(s), tup(p), (1,) * nd, tr, (0,) * nd, 1, mask)

    with torch.no_grad():
        report(name, "k:fwd", m, 1, best_of(runs, lambda: fn(x, w)))
        report(name, "k:dx", m, 1, best_of(runs, bwd([True, False, False])))
        report(name, "k:dw", m, 1, best_of(runs, bwd([False, True, False])))


# name -> (x shape, w shape, fn, forward MACs); names and shapes as in benches/conv.rs
WORKLOADS = [
    ("conv2d (2,32,256,256) 3x3 32->32", (2, 32, 256, 256), (32, 32, 3, 3), conv_p1,
     macs(2, 32, 32, 9, 65536)),
    ("conv2d (2,32,256,128) 3x3 s2 32->64", (2, 32, 256, 128), (64, 32, 3, 3), conv_s2,
     macs(2, 32, 64, 9, 128 * 64)),
    ("conv2d (2,128,64,32) 3x3 128->128", (2, 128, 64, 32), (128, 128, 3, 3), conv_p1,
     macs(2, 128, 128, 9, 64 * 32)),
    ("conv2d (2,256,32,16) 3x3 256->256", (2, 256, 32, 16), (256, 256, 3, 3), conv_p1,
     macs(2, 256, 256, 9, 32 * 16)),
    ("conv2d (2,512,8,4) 3x3 512->512", (2, 512, 8, 4), (512, 512, 3, 3), conv_p1,
     macs(2, 512, 512, 9, 8 * 4)),
    ("conv2d (2,1024,16,8) 3x3 1024->512", (2, 1024, 16, 8), (512, 1024, 3, 3), conv_p1,
     macs(2, 1024, 512, 9, 16 * 8)),
    ("conv_transpose2d k=s=2 (2,64,128,64)->32", (2, 64, 128, 64), (64, 32, 2, 2), convt_k2,
     macs(2, 64, 32, 4, 128 * 64)),
    ("conv3d (2,32,64,64,64) 3x3x3 32->32", (2, 32, 64, 64, 64), (32, 32, 3, 3, 3), conv_p1,
     macs(2, 32, 32, 27, 262144)),
    ("conv3d (2,32,16,128,128) 1x3x3 32->32", (2, 32, 16, 128, 128), (32, 32, 1, 3, 3), conv_aniso,
     macs(2, 32, 32, 9, 16 * 128 * 128)),
    ("conv3d (2,32,16,128,128) 1x3x3 s(1,2,2)", (2, 32, 16, 128, 128), (32, 32, 1, 3, 3),
     conv_aniso_s122, macs(2, 32, 32, 9, 16 * 64 * 64)),
    # the 3D demo plan (24x56x56, batch 2, 32..320)
    ("conv3d (2,64,24,28,28) 1x3x3 64->64", (2, 64, 24, 28, 28), (64, 64, 1, 3, 3), conv_aniso,
     macs(2, 64, 64, 9, 24 * 28 * 28)),
    ("conv3d (2,128,24,14,14) 3x3x3 128->128", (2, 128, 24, 14, 14), (128, 128, 3, 3, 3),
     conv_p1, macs(2, 128, 128, 27, 24 * 14 * 14)),
    ("conv3d (2,256,24,14,14) 3x3x3 256->128", (2, 256, 24, 14, 14), (128, 256, 3, 3, 3),
     conv_p1, macs(2, 256, 128, 27, 24 * 14 * 14)),
    ("conv3d (2,256,12,7,7) 3x3x3 256->256", (2, 256, 12, 7, 7), (256, 256, 3, 3, 3), conv_p1,
     macs(2, 256, 256, 27, 12 * 7 * 7)),
    ("conv3d (2,320,6,7,7) 3x3x3 320->320", (2, 320, 6, 7, 7), (320, 320, 3, 3, 3), conv_p1,
     macs(2, 320, 320, 27, 6 * 7 * 7)),
    ("conv_transpose3d k=s=2 (2,64,32^3)->32", (2, 64, 32, 32, 32), (64, 32, 2, 2, 2), convt_k2,
     macs(2, 64, 32, 8, 32768)),
]


CLOCK = time.perf_counter


def best_of(runs, f):
    f()
    best = float("inf")
    for _ in range(runs):
        t = CLOCK()
        f()
        best = min(best, CLOCK() - t)
    return best


def report(name, pass_, m, mult, s):
    print(f"GFLOP/s {name:<44} {pass_:<8} {s:8.4f} s {2 * m * mult / s / 1e9:8.1f} GFLOP/s",
          flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("filter", nargs="?", default="")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("RAYON_NUM_THREADS", "0")
                                                        or os.cpu_count()))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cpu", action="store_true",
                    help="process CPU time instead of wall time (as NNSEG_BENCH_CPU=1)")
    a = ap.parse_args()
    if a.cpu:
        global CLOCK
        CLOCK = time.process_time
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cap = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}, ATen cpu capability: "
          f"{cap}, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}", flush=True)
    for name, xs, ws, fn, m in WORKLOADS:
        if not name.startswith(a.filter):
            continue
        x = torch.randn(xs, requires_grad=True)
        w = torch.randn(ws, requires_grad=True)
        with torch.no_grad():
            r = torch.randn(fn(x, w).shape)

        def fwd():
            with torch.no_grad():
                fn(x, w)

        def fwd_bwd():
            x.grad = None
            w.grad = None
            (fn(x, w) * r).sum().backward()

        report(name, "fwd", m, 1, best_of(a.runs, fwd))
        report(name, "fwd+bwd", m, 3, best_of(a.runs, fwd_bwd))
        if os.environ.get("NNSEG_BENCH_PARTS"):
            parts(name, x, w, r, fn, m, a.runs)


if __name__ == "__main__":
    main()
