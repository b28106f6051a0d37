#!/usr/bin/env python3
"""PyTorch side of scripts/bench_gpu.sh: one nnU-Net training step on a PlainConvUNet, timed.

Plain torch only (dynamic_network_architectures is not needed): the network, loss and optimizer
step are written out here the way nnU-Net v2 builds them for its default trainer:
  - PlainConvUNet: per stage n_conv x (Conv(k3, bias) -> InstanceNorm(eps 1e-5, affine) ->
    LeakyReLU(0.01)), the first conv of a stage strided; decoder ConvTranspose(k = s = stride),
    concat skip, n_conv blocks, 1x1 seg head per decoder stage (deep supervision).
  - DC_and_CE_loss (MemoryEfficientSoftDiceLoss, softmax, do_bg=False, smooth 1e-5, batch_dice)
    + CE, DeepSupervisionWrapper weights 1/2^i, last 0, normalised.
  - SGD(lr 1e-2, momentum 0.99, nesterov, weight_decay 3e-5), AMP (autocast fp16 + GradScaler),
    clip_grad_norm_(12), cudnn.benchmark = True. --compile adds torch.compile (nnU-Net's default
    on Linux + CUDA). --amp-dtype bf16: autocast(bfloat16) without a GradScaler (bf16 has f32's
    range), the precision nnseg's --amp uses (scripts/gpu_acceptance.sh compares at bf16).

Prints one JSON line. `--table a.json b.json ...` instead prints a side-by-side table of result
files written by this script and by `nnseg bench_train --json`.
"""
import argparse
import json
import sys
import time

PRESETS = {
    # nnU-Net's typical 3d_fullres plan (e.g. a ~1 mm CT task): 128^3, batch 2, 6 stages.
    "3d_fullres": dict(patch=[128, 128, 128], batch=2, features=[32, 64, 128, 256, 320, 320]),
    # nnU-Net's typical 2d plan: 512^2, batch 12, 7 stages up to 512 features.
    "2d": dict(patch=[512, 512], batch=12, features=[32, 64, 128, 256, 512, 512, 512]),
}


def build_net(torch, nn, dim, in_ch, n_cls, features, strides, n_conv=2, kernels=None):
    """strides / kernels: per stage, an int or a per-axis list."""
    kernels = kernels or [3] * len(features)
    Conv = nn.Conv3d if dim == 3 else nn.Conv2d
    ConvT = nn.ConvTranspose3d if dim == 3 else nn.ConvTranspose2d
    Norm = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d

    def block(cin, cout, stride, k=3):
        layers = []
        pad = [v // 2 for v in k] if isinstance(k, (list, tuple)) else k // 2
        for i in range(n_conv):
            layers += [
                Conv(cin if i == 0 else cout, cout, k, stride if i == 0 else 1, pad, bias=True),
                Norm(cout, eps=1e-5, affine=True),
                nn.LeakyReLU(0.01, inplace=True),
            ]
        return nn.Sequential(*layers)

    class PlainConvUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.ModuleList()
            c = in_ch
            for f, s, k in zip(features, strides, kernels):
                self.enc.append(block(c, f, s, k))
                c = f
            self.up = nn.ModuleList()
            self.dec = nn.ModuleList()
            self.seg = nn.ModuleList()
            for s in range(1, len(features)):
                fb, fs, st = features[-s], features[-(s + 1)], strides[-s]
                self.up.append(ConvT(fb, fs, st, st, bias=True))
                self.dec.append(block(2 * fs, fs, 1, kernels[-(s + 1)]))
                self.seg.append(Conv(fs, n_cls, 1, 1, 0, bias=True))

        def forward(self, x):
            skips = []
            for e in self.enc:
                x = e(x)
                skips.append(x)
            lres = skips[-1]
            outs = []
            for i in range(len(self.dec)):
                x = self.up[i](lres)
                x = torch.cat((x, skips[-(i + 2)]), 1)
                x = self.dec[i](x)
                outs.append(self.seg[i](x))
                lres = x
            return outs[::-1]  # full resolution first

    net = PlainConvUNet()
    for m in net.modules():  # InitWeights_He(1e-2)
        if isinstance(m, (Conv, ConvT)):
            nn.init.kaiming_normal_(m.weight, a=1e-2)
            nn.init.zeros_(m.bias)
    return net


def run(a):
    import torch
    from torch import nn

    if not torch.cuda.is_available() and a.device.startswith("cuda"):
        print(json.dumps({"side": "pytorch", "error": "torch.cuda.is_available() is False"}))
        return 1
    dev = torch.device(a.device)
    p = dict(PRESETS[a.config])
    if a.patch:
        p["patch"] = [int(v) for v in a.patch.split(",")]
    if a.batch_size:
        p["batch"] = a.batch_size
    if a.features:
        p["features"] = [int(v) for v in a.features.split(",")]
    dim = len(p["patch"])
    nst = len(p["features"])
    strides = [1] + [2] * (nst - 1)
    kernels = None
    if a.strides:
        strides = [[int(v) for v in st.split(",")] for st in a.strides.split(";")]
    if a.kernels:
        kernels = [[int(v) for v in st.split(",")] for st in a.kernels.split(";")]
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = False
    torch.manual_seed(0)
    net = build_net(torch, nn, dim, a.in_channels, a.num_classes, p["features"], strides, kernels=kernels).to(dev)
    if a.compile:
        net = torch.compile(net)
    opt = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    amp = a.amp and dev.type == "cuda"
    amp_dtype = torch.bfloat16 if a.amp_dtype == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if amp and amp_dtype == torch.float16 else None

    # deep supervision: one output per decoder stage; weights 1/2^i, last 0, normalised
    nout = nst - 1
    w = [1 / 2**i for i in range(nout)]
    w[-1] = 0
    w = [v / sum(w) for v in w]
    x = torch.randn([p["batch"], a.in_channels] + p["patch"], device=dev)
    y = torch.randint(0, a.num_classes, [p["batch"], 1] + p["patch"], device=dev)
    targets = []
    f = [1] * dim
    for i in range(nout):
        sl = (slice(None), slice(None)) + tuple(slice(None, None, f[d]) for d in range(dim))
        targets.append(y[sl].contiguous())
        st = strides[i + 1]
        f = [f[d] * (st[d] if isinstance(st, list) else st) for d in range(dim)]
    ce = nn.CrossEntropyLoss()

    def dice(logits, t):
        axes = [0] + list(range(2, logits.ndim))  # batch_dice
        pr = torch.softmax(logits, 1)[:, 1:]
        with torch.no_grad():
            oh = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, t.long(), 1)[:, 1:]
            sum_gt = oh.sum(axes)
        inter = (pr * oh).sum(axes)
        sum_pred = pr.sum(axes)
        dc = (2 * inter + 1e-5) / torch.clip(sum_gt + sum_pred + 1e-5, 1e-8)
        return -dc.mean()

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    phase = {"fwd_s": 0.0, "bwd_s": 0.0, "opt_s": 0.0}  # summed over the timed steps

    def lap(key, t0):
        sync()
        t1 = time.perf_counter()
        phase[key] += t1 - t0
        return t1

    def step():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
            outs = net(x)
            loss = 0
            for wi, o, t in zip(w, outs, targets):
                if wi != 0:
                    loss = loss + wi * (ce(o, t[:, 0].long()) + dice(o, t))
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            scaler.step(opt)
            scaler.update()
        else:
            t0 = lap("fwd_s", t0)
            loss.backward()
            t0 = lap("bwd_s", t0)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            opt.step()
            lap("opt_s", t0)
        return loss

    for _ in range(a.warmup):
        step()
    sync()
    phase.update({k: 0.0 for k in phase})
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if a.profile:  # one profiled step, its ops by self CPU time, on stderr
        from torch.profiler import profile
        with profile() as prof:
            step()
            sync()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    res = {
        "side": "pytorch",
        "config": a.config,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "amp": amp,
        "amp_dtype": a.amp_dtype if amp else None,
        "compile": a.compile,
        "patch": p["patch"],
        "batch_size": p["batch"],
        "features": p["features"],
        "params": sum(q.numel() for q in net.parameters()),
        "iters": a.iters,
        "step_s_median": med,
        "step_s_min": times[0],
        "iters_per_s": 1.0 / med,
        "loss": float(loss.detach()),
    }
    if scaler is None:  # mean seconds per step of each phase (as nnseg bench_train reports)
        res.update({k: v / a.iters for k, v in phase.items()})
    if dev.type == "cuda":
        res["peak_mem_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        res["peak_reserved_mib"] = torch.cuda.max_memory_reserved(dev) / 2**20
    print(json.dumps(res))
    return 0


def table(files):
    rows = []
    for fn in files:
        try:
            with open(fn) as fh:
                lines = [l for l in fh.read().splitlines() if l.strip().startswith("{")]
            rows.append(json.loads(lines[-1]))
        except (OSError, IndexError, ValueError) as e:
            print(f"  ({fn}: no result: {e})")
    by = {}
    for r in rows:
        by.setdefault(r.get("config", "?"), {})[r.get("side", "?")] = r
    print(f"{'config':<11} {'side':<8} {'patch x batch':<20} {'it/s':>7} {'s/it':>7} {'peak MiB':>9}  notes")
    for cfg, sides in by.items():
        for side, r in sides.items():
            if "error" in r:
                print(f"{cfg:<11} {side:<8} error: {r['error']}")
                continue
            pb = "x".join(map(str, r.get("patch", []))) + f" x{r.get('batch_size', '?')}"
            peak = r.get("peak_mem_mib") or r.get("nvidia_smi_peak_mib")
            notes = []
            if side == "pytorch":
                notes.append((f"AMP {r.get('amp_dtype') or 'fp16'}" if r.get("amp") else "fp32")
                             + (" compile" if r.get("compile") else ""))
            if r.get("nvidia_smi_peak_mib"):
                notes.append(f"nvidia-smi peak {r['nvidia_smi_peak_mib']:.0f} MiB")
            print(f"{cfg:<11} {side:<8} {pb:<20} {r['iters_per_s']:>7.2f} {r['step_s_median']:>7.3f} "
                  f"{(peak if peak else float('nan')):>9.0f}  {', '.join(notes)}")
        n, t = sides.get("nnseg"), sides.get("pytorch")
        if n and t and "error" not in n and "error" not in t:
            print(f"{cfg:<11} ratio    nnseg step time / PyTorch step time = "
                  f"{n['step_s_median'] / t['step_s_median']:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(PRESETS), default="3d_fullres")
    ap.add_argument("--patch", help="comma-separated patch size (overrides the preset)")
    ap.add_argument("--batch_size", type=int)
    ap.add_argument("--features", help="comma-separated features per stage")
    ap.add_argument("--strides", help='per-stage strides, e.g. "1,1,1;1,2,2;2,2,2"')
    ap.add_argument("--kernels", help='per-stage kernel sizes, same format as --strides')
    ap.add_argument("--in_channels", type=int, default=1)
    ap.add_argument("--num_classes", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-amp", dest="amp", action="store_false")
    ap.add_argument("--amp-dtype", dest="amp_dtype", choices=["fp16", "bf16"], default="fp16",
                    help="autocast dtype (fp16 with GradScaler, as nnU-Net; bf16 without)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print one step's ops by self time on stderr")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print a comparison table and exit")
    a = ap.parse_args()
    if a.table:
        table(a.table)
        return 0
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
