"""Reference predictions of nnU-Net's own predictor on the nnU-Net model fixtures.

    python scripts/nnunet_reference.py make    [--out DIR]   # inputs + nnUNetv2 predictions
    python scripts/nnunet_reference.py compare --ref DIR --pred3d DIR --pred2d DIR

`make` writes, for both fixture models (tests/fixtures/nnunet_checkpoint), a few small input
images (fixed seeds) into DIR/{3d,2d}/input and runs `nnUNetv2_predict_from_modelfolder` on
them with fold 0, checkpoint_final.pth, TTA on, --save_probabilities, on the CPU; the
segmentations and probabilities land in DIR/{3d,2d}/nnunet. Run it with the python of a venv
that has nnunetv2 (scripts/compare_nnunet_predict.sh does this with NNUNET_PY).

`compare` prints per-case Dice (per foreground label, against nnU-Net's segmentation) and the
max |probability difference| of nnseg's predictions against the reference, and exits 1 when a
case has Dice < 0.999 or a probability differs by more than 1e-3.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures", "nnunet_checkpoint")
MODELS = {
    "3d": os.path.join(FIXTURES, "Dataset991_Fixture3D", "nnUNetTrainer__nnUNetPlans__3d_fullres"),
    "2d": os.path.join(FIXTURES, "Dataset992_Fixture2D", "nnUNetTrainer__nnUNetPlans__2d"),
}
# (case, shape zyx, spacing zyx): larger than one patch (sliding window with overlap), smaller
# than one patch (padding), and a spacing other than the plans' (resampling there and back)
CASES = {
    "3d": [
        ("big", (10, 40, 36), (4.0, 1.0, 1.0)),
        ("small", (6, 20, 28), (4.0, 1.0, 1.0)),
        ("resampled", (7, 30, 26), (5.0, 1.2, 1.1)),
    ],
    "2d": [
        ("big", (1, 44, 30), (999.0, 1.0, 1.0)),
        ("small", (1, 20, 16), (999.0, 1.0, 1.0)),
    ],
}
CHANNELS = {"3d": 1, "2d": 2}


def smooth_image(rng, shape):
    """Random blobs: structured enough for non-trivial segmentations."""
    from scipy.ndimage import gaussian_filter

    x = rng.standard_normal(shape).astype(np.float32)
    x = gaussian_filter(x, sigma=(0.7, 2.0, 2.0)) * 4.0
    return (x + 0.3 * rng.standard_normal(shape)).astype(np.float32)


def make_inputs(out, kind):
    import SimpleITK as sitk

    folder = os.path.join(out, kind, "input")
    os.makedirs(folder, exist_ok=True)
    for i, (case, shape, spacing) in enumerate(CASES[kind]):
        for c in range(CHANNELS[kind]):
            rng = np.random.default_rng(100 * i + c + (0 if kind == "3d" else 50))
            img = sitk.GetImageFromArray(smooth_image(rng, shape))
            img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
            img.SetOrigin((1.5, -2.0, 3.0))
            sitk.WriteImage(img, os.path.join(folder, f"{kind}_{case}_{c:04d}.nii.gz"))
    return folder


def make(out):
    for kind, model in MODELS.items():
        inp = make_inputs(out, kind)
        pred = os.path.join(out, kind, "nnunet")
        subprocess.run(
            [
                os.path.join(os.path.dirname(sys.executable), "nnUNetv2_predict_from_modelfolder"),
                "-i", inp, "-o", pred, "-m", model, "-f", "0",
                "-chk", "checkpoint_final.pth", "-device", "cpu",
                "--save_probabilities", "-npp", "1", "-nps", "1",
            ],
            check=True,
        )
        for f in os.listdir(pred):
            if not (f.endswith(".nii.gz") or f.endswith(".npz")):
                os.remove(os.path.join(pred, f))
            elif f.endswith(".npz"):
                # float32 probabilities, compressed
                p = np.load(os.path.join(pred, f))["probabilities"].astype(np.float32)
                np.savez_compressed(os.path.join(pred, f), probabilities=p)
        print(f"{kind}: {sorted(os.listdir(pred))}")


def dice(a, b):
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


def compare(ref, preds):
    import SimpleITK as sitk

    ok = True
    report = []
    for kind, pred in preds.items():
        folder = os.path.join(ref, kind, "nnunet")
        for f in sorted(os.listdir(folder)):
            if not f.endswith(".nii.gz"):
                continue
            case = f[: -len(".nii.gz")]
            want = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, f)))
            got = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(pred, f)))
            labels = [l for l in np.unique(want) if l != 0]
            d = min((dice(want == l, got == l) for l in labels), default=1.0)
            pw = np.load(os.path.join(folder, case + ".npz"))["probabilities"]
            pg = np.load(os.path.join(pred, case + ".npz"))["probabilities"]
            dp = float(np.abs(pw - pg).max()) if pw.shape == pg.shape else float("inf")
            agree = float((want == got).mean())
            report.append({"case": case, "min_dice": d, "voxel_agreement": agree, "max_prob_diff": dp})
            print(f"{case:14s} min Dice {d:.6f}  voxels equal {agree:.6f}  max |dp| {dp:.2e}")
            ok &= d >= 0.999 and dp <= 1e-3
    return ok, report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["make", "compare"])
    ap.add_argument("--out", default=os.path.join(FIXTURES, "reference"))
    ap.add_argument("--ref", default=os.path.join(FIXTURES, "reference"))
    ap.add_argument("--pred3d")
    ap.add_argument("--pred2d")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.mode == "make":
        make(a.out)
        return
    preds = {k: v for k, v in (("3d", a.pred3d), ("2d", a.pred2d)) if v}
    ok, report = compare(a.ref, preds)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(report, fh, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
