#!/usr/bin/env python
"""Write an nnU-Net v2 3D model folder (5 folds, untrained but non-trivial weights) and 3D input
cases for the prediction benchmark nnseg vs nnU-Net (scripts/bench_predict_3d_vs_nnunet.sh).

Usage (with the python of a venv that has nnunetv2 installed, e.g. nnunetv2==2.8.1):

  python scripts/make_bench_model.py --out WORK [--shape 128,256,256] [--patch 64,128,128]
                                     [--features 8,16,32,64,128] [--cases 2]

writes
  WORK/results/Dataset993_Bench3D/nnUNetTrainer__nnUNetPlans__3d_fullres/
      plans.json, dataset.json (background + 4 foreground labels: 5 output classes),
      fold_0 .. fold_4/checkpoint_final.pth
  WORK/input/bench_NNN_0000.nii.gz   (--cases single-channel images of --shape, z,y,x order)

The model: nnU-Net's own ``nnUNetTrainer`` is instantiated from the plans (CPU device, fold f),
the network is built by ``nnUNetTrainer.build_network_architecture`` (-> get_network_from_plans ->
dynamic_network_architectures PlainConvUNet with He init) right after ``torch.manual_seed(100 + f)``,
then the InstanceNorm affines and the conv / transposed-conv biases are perturbed a little (He
init leaves them at 1 and 0) and the checkpoint is written by ``nnUNetTrainer.save_checkpoint``
itself (network_weights, optimizer_state, grad_scaler_state, logging, _best_ema, current_epoch,
init_args, trainer_name, inference_allowed_mirroring_axes), with no training step: the
prediction speed does not depend on the weight values. The bias of the final 1x1x1 conv (the
segmentation head) is centred over the classes and then shifted per class so that every one of
the 5 labels takes a good share of the voxels (otherwise one class tends to win almost everywhere
and the Dice check would test little).

Default network (and why): 3d_fullres, patch 64x128x128, 5 stages with 8,16,32,64,128 features,
strides 1,2,2,2,2 (isotropic 3x3x3 kernels, 2 convs per stage on both sides), batch size 2. That is
nnU-Net's PlainConvUNet topology with 1/4 of its usual features (32..320) and fewer stages, so
that 5 folds with mirroring TTA (8 forward passes per tile) on 128x256x256 cases stay feasible on
a 2-core CPU: 27 tiles per case and fold (3 per axis at step 0.5), about 15 GMAC (30 GFLOP) per
forward pass, i.e. about 1080 passes per case for 5 folds with TTA. The strides halve every axis
that is even and >= 8 (other patches: --patch). The spacing of the plans is (2.0, 0.8, 0.8) mm
(z, y, x).

Input cases (fixed seed 1234): random blob images (see smooth_blobs: 5 intensity classes with
smooth blob-shaped boundaries, slow shading, little noise), float32, values 1 .. ~230, no zeros.
Case 0 has the plans' spacing (no resampling); case 1 (if --cases >= 2) has spacing
(1.8, 0.7, 0.7), so that both preprocessing and export resample (a 128x256x256 case becomes
115x224x224 at the plans' spacing: again 27 tiles; a coarser spacing would need up to 64), and
zero slabs at its borders (4 slices in z, 8 rows in y) so that nnU-Net's crop-to-nonzero and the
un-crop at export are exercised. Further cases alternate.

Prints a JSON summary (paths, parameter count, voxel counts) on stdout.
"""
import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path

DATASET_NAME = 'Dataset993_Bench3D'
CONFIGURATION = '3d_fullres'
LABELS = {'background': 0, 'organ_a': 1, 'organ_b': 2, 'lesion_c': 3, 'vessel_d': 4}
PLANS_SPACING = [2.0, 0.8, 0.8]
OTHER_SPACING = [1.8, 0.7, 0.7]
SEED_DATA = 1234


def ints(s):
    return [int(v) for v in s.split(',')]


def make_plans_and_dataset_json(patch, features):
    n_stages = len(features)
    # strides: full resolution first, then halve every axis while the patch allows it
    strides = [[1, 1, 1]]
    size = list(patch)
    for _ in range(n_stages - 1):
        st = [2 if s % 2 == 0 and s >= 8 else 1 for s in size]
        size = [s // t for s, t in zip(size, st)]
        strides.append(st)
    resampling_kwargs = lambda is_seg, order: {'is_seg': is_seg, 'order': order, 'order_z': 0,
                                               'force_separate_z': None}
    configuration = {
        'data_identifier': f'nnUNetPlans_{CONFIGURATION}',
        'preprocessor_name': 'DefaultPreprocessor',
        'batch_size': 2,
        'patch_size': list(patch),
        'median_image_size_in_voxels': [float(2 * p) for p in patch],
        'spacing': list(PLANS_SPACING),
        'normalization_schemes': ['ZScoreNormalization'],
        'use_mask_for_norm': [False],
        'resampling_fn_data': 'resample_data_or_seg_to_shape',
        'resampling_fn_seg': 'resample_data_or_seg_to_shape',
        'resampling_fn_data_kwargs': resampling_kwargs(False, 3),
        'resampling_fn_seg_kwargs': resampling_kwargs(True, 1),
        'resampling_fn_probabilities': 'resample_data_or_seg_to_shape',
        'resampling_fn_probabilities_kwargs': resampling_kwargs(False, 1),
        'architecture': {
            'network_class_name': 'dynamic_network_architectures.architectures.unet.PlainConvUNet',
            'arch_kwargs': {
                'n_stages': n_stages,
                'features_per_stage': list(features),
                'conv_op': 'torch.nn.modules.conv.Conv3d',
                'kernel_sizes': [[3, 3, 3]] * n_stages,
                'strides': strides,
                'n_conv_per_stage': [2] * n_stages,
                'n_conv_per_stage_decoder': [2] * (n_stages - 1),
                'conv_bias': True,
                'norm_op': 'torch.nn.modules.instancenorm.InstanceNorm3d',
                'norm_op_kwargs': {'eps': 1e-05, 'affine': True},
                'dropout_op': None,
                'dropout_op_kwargs': None,
                'nonlin': 'torch.nn.LeakyReLU',
                'nonlin_kwargs': {'inplace': True},
            },
            '_kw_requires_import': ['conv_op', 'norm_op', 'dropout_op', 'nonlin'],
        },
        'batch_dice': False,
    }
    plans = {
        'dataset_name': DATASET_NAME,
        'plans_name': 'nnUNetPlans',
        'original_median_spacing_after_transp': list(PLANS_SPACING),
        'original_median_shape_after_transp': [2 * p for p in patch],
        'image_reader_writer': 'SimpleITKIO',
        'transpose_forward': [0, 1, 2],
        'transpose_backward': [0, 1, 2],
        'configurations': {CONFIGURATION: configuration},
        'experiment_planner_used': 'ExperimentPlanner',
        'label_manager': 'LabelManager',
        'foreground_intensity_properties_per_channel': {
            '0': {'max': 300.0, 'mean': 100.0, 'median': 100.0, 'min': 0.0,
                  'percentile_00_5': 10.0, 'percentile_99_5': 220.0, 'std': 40.0}},
    }
    dataset_json = {
        'channel_names': {'0': 'CT'},
        'labels': dict(LABELS),
        'numTraining': 5,
        'file_ending': '.nii.gz',
        'name': DATASET_NAME.split('_', 1)[1],
        'description': 'Synthetic benchmark model (untrained, perturbed random weights; generated by '
                       'scripts/make_bench_model.py). Not a real dataset.',
    }
    return plans, dataset_json


def perturb_network(network, generator, torch):
    """InstanceNorm affines and conv biases away from He init's 1 / 0 (in place)."""
    conv_types = (torch.nn.Conv3d, torch.nn.ConvTranspose3d)
    with torch.no_grad():
        for _, m in network.named_modules():  # named_modules de-duplicates aliased modules
            if isinstance(m, torch.nn.InstanceNorm3d) and m.affine:
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=generator))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=generator))
            elif isinstance(m, conv_types) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))


def balance_seg_head(network, x, torch, np):
    """Shift the full-resolution segmentation head's bias so that all classes get a share of the
    argmax on a sample input (one forward pass, then a fixed-point iteration on per-class offsets);
    returns the shares reached on the sample."""
    head = network.decoder.seg_layers[-1]
    network.eval()
    with torch.no_grad():
        # centre the head over the classes (softmax does not change): no common offset in the
        # logits for nnU-Net's f16 sliding-window sums to round away
        head.weight.sub_(head.weight.mean(0, keepdim=True))
        head.bias.sub_(head.bias.mean())
        logits = network(x)
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        lg = logits[0].reshape(logits.shape[1], -1).numpy()
        n = lg.shape[0]
        # background gets the largest share; the others a shrinking one (like organs > lesions)
        target = np.array([0.4] + [0.6 * w / sum(range(1, n)) for w in range(n - 1, 0, -1)])
        shift = np.zeros(n)
        for _ in range(200):  # simple fixed-point iteration on the argmax shares
            share = np.bincount(np.argmax(lg + shift[:, None], 0), minlength=n) / lg.shape[1]
            shift += 0.5 * np.std(lg) * (np.log(target + 1e-3) - np.log(share + 1e-3)) / 4
        shift -= shift.mean()
        head.bias.add_(torch.from_numpy(shift).to(head.bias.dtype))
    share = np.bincount(np.argmax(lg + shift[:, None], 0), minlength=n) / lg.shape[1]
    return [round(float(s), 3) for s in share]


def build_folds(out_root, patch, features, torch, np):
    from batchgenerators.utilities.file_and_folder_operations import save_json, join
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    plans, dataset_json = make_plans_and_dataset_json(patch, features)
    dataset_dir = out_root / DATASET_NAME
    if dataset_dir.exists():
        shutil.rmtree(dataset_dir)
    shares = {}
    sample = torch.from_numpy(smooth_blobs(np, patch, np.random.default_rng(7)))  # one patch-sized input
    sample = ((sample - sample.mean()) / sample.std())[None, None]
    for fold in range(5):
        plans_in = copy.deepcopy(plans)
        plans_in['continue_training'] = False  # what run_training.py adds
        trainer = nnUNetTrainer(plans=plans_in, configuration=CONFIGURATION, fold=fold,
                                dataset_json=copy.deepcopy(dataset_json), device=torch.device('cpu'))
        # the body of nnUNetTrainer.initialize() minus the dataset lookup (no preprocessed data here)
        trainer._set_batch_size_and_oversample()
        trainer.num_input_channels = determine_num_input_channels(
            trainer.plans_manager, trainer.configuration_manager, trainer.dataset_json)
        torch.manual_seed(100 + fold)
        trainer.network = trainer.build_network_architecture(
            trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
            trainer.label_manager.num_segmentation_heads, trainer.enable_deep_supervision).to(trainer.device)
        perturb_network(trainer.network, torch.Generator().manual_seed(200 + fold), torch)
        shares[fold] = balance_seg_head(trainer.network, sample, torch, np)
        trainer.network.train()
        trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
        trainer.was_initialized = True
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # inference_allowed_mirroring_axes
        trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
        if fold == 0:  # what on_train_start writes into the results folder
            save_json(trainer.plans_manager.plans, join(trainer.output_folder_base, 'plans.json'), sort_keys=False)
            save_json(trainer.dataset_json, join(trainer.output_folder_base, 'dataset.json'), sort_keys=False)
        fold_dir = Path(trainer.output_folder)
        fold_dir.mkdir(parents=True, exist_ok=True)
        trainer.current_epoch = 999  # saved as current_epoch + 1 = 1000, as after a full training
        trainer.save_checkpoint(str(fold_dir / 'checkpoint_final.pth'))
        for f in fold_dir.iterdir():  # drop by-products (training log)
            if f.name != 'checkpoint_final.pth':
                f.unlink()
        model_dir = Path(trainer.output_folder_base)
    n_params = sum(p.numel() for p in trainer.network.parameters())
    ckpt = torch.load(model_dir / 'fold_0' / 'checkpoint_final.pth', map_location='cpu', weights_only=False)
    return model_dir, n_params, shares, list(ckpt.keys()), ckpt['inference_allowed_mirroring_axes']


def smooth_blobs(np, shape, rng):
    """Random blob image, float32, strictly positive: 5 tissue classes cut from a smooth random
    field at fixed quantiles (blob-shaped regions with smooth boundaries) plus a few ellipsoids,
    one intensity per class (20 .. 210), blurred by 1 voxel (partial volume), a slow shading of
    +-10 and voxel noise of std 0.5.
    Piecewise constant rather than one smooth field so that the network output has regions with
    edges that follow the image; an untrained network's argmax is still fragmented (small class
    margins), so the segmentations are a demanding agreement test."""
    from scipy.ndimage import gaussian_filter
    shape = tuple(shape)
    sh = np.array(shape, float)

    def field(sigma):
        f = gaussian_filter(rng.standard_normal(shape).astype(np.float32), np.maximum(sigma, 1.0), mode='wrap')
        return (f - f.mean()) / (f.std() + 1e-8)

    f = field(sh / 10.0) + 0.3 * field(sh / 30.0)
    region = np.digitize(f, np.quantile(f, [0.35, 0.6, 0.8, 0.93])).astype(np.int8)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    for _ in range(6):
        c = rng.uniform(0.15, 0.85, 3) * sh
        r = rng.uniform(0.04, 0.12, 3) * sh
        d = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r))
        region[d < 1.0] = rng.integers(1, 5)
    intensity = rng.permutation(np.array([20.0, 60.0, 100.0, 150.0, 210.0], np.float32))
    img = gaussian_filter(intensity[region], 1.0)
    img += 10.0 * field(sh / 4.0) + 0.5 * rng.standard_normal(shape).astype(np.float32)
    return np.clip(img, 1.0, None).astype(np.float32)


def write_cases(out_dir, shape, n_cases, np):
    import SimpleITK as sitk
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED_DATA)
    written = []
    for i in range(n_cases):
        img = smooth_blobs(np, shape, rng)
        spacing = PLANS_SPACING if i % 2 == 0 else OTHER_SPACING
        if i % 2 == 1:  # zero border slabs: crop-to-nonzero on input, un-crop on export
            img[:4] = 0
            img[-4:] = 0
            img[:, :8] = 0
        im = sitk.GetImageFromArray(img)            # numpy z,y,x -> ITK x,y,z
        im.SetSpacing([float(s) for s in spacing[::-1]])
        im.SetOrigin((-10.0 * i, 5.0, 2.5))
        path = out_dir / f'bench_{i:03d}_0000.nii.gz'
        sitk.WriteImage(im, str(path), useCompression=True)
        written.append({'file': path.name, 'shape_zyx': list(img.shape), 'spacing_zyx': spacing})
    return written


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', required=True, help='work folder (results/ and input/ are written inside)')
    ap.add_argument('--shape', default='128,256,256', help='case shape z,y,x (default 128,256,256)')
    ap.add_argument('--patch', default='64,128,128', help='network patch z,y,x (default 64,128,128)')
    ap.add_argument('--features', default='8,16,32,64,128', help='features per stage (default 8,16,32,64,128)')
    ap.add_argument('--cases', type=int, default=2, help='number of input cases (default 2)')
    args = ap.parse_args()
    out = Path(args.out).resolve()
    shape, patch, features = ints(args.shape), ints(args.patch), ints(args.features)
    assert len(shape) == 3 and len(patch) == 3, 'shape and patch are z,y,x'

    os.environ['nnUNet_results'] = str(out / 'results')
    os.environ.pop('nnUNet_preprocessed', None)
    os.environ.pop('nnUNet_raw', None)
    os.environ['nnUNet_compile'] = 'false'
    os.environ['nnUNet_wandb_enabled'] = '0'
    import numpy as np
    import torch
    torch.set_num_threads(1)  # reproducible

    model_dir, n_params, shares, ckpt_keys, mirror_axes = build_folds(out / 'results', patch, features, torch, np)
    cases = write_cases(out / 'input', shape, args.cases, np)
    summary = {'model_folder': str(model_dir), 'input_folder': str(out / 'input'),
               'patch': patch, 'features': features, 'param_count': int(n_params),
               'checkpoint_keys': ckpt_keys, 'inference_allowed_mirroring_axes': list(mirror_axes),
               'argmax_class_shares_on_sample_per_fold': shares, 'cases': cases}
    print('{\n' + ',\n'.join(f' {json.dumps(k)}: {json.dumps(v)}' for k, v in summary.items()) + '\n}')


if __name__ == '__main__':
    sys.exit(main())
