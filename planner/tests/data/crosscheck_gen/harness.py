"""Run nnU-Net 2.8.1's real ExperimentPlanner / ResEnc planner code on synthetic fingerprints.

torch and dynamic_network_architectures are not installed; they are replaced by stubs. The
network estimate is a direct Python transcription of dna 0.4.4's compute_conv_feature_map_size
(PlainConvEncoder / ResidualEncoder(BasicBlockD) / UNetDecoder), no deep supervision.
"""
import json
import os
import sys
import tempfile
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def mod(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def cls(name, module):
    c = type(name, (object,), {})
    c.__module__ = module
    return c


# ---- torch stub
nn = mod('torch.nn')
for n in ['Conv2d', 'Conv3d']:
    setattr(nn, n, cls(n, 'torch.nn.modules.conv'))
for n in ['InstanceNorm2d', 'InstanceNorm3d']:
    setattr(nn, n, cls(n, 'torch.nn.modules.instancenorm'))
nn.LeakyReLU = cls('LeakyReLU', 'torch.nn.modules.activation')
torch = mod('torch', nn=nn, get_num_threads=lambda: 1, set_num_threads=lambda n: None,
            device=cls('device', 'torch'))

# ---- dna stub
mod('dynamic_network_architectures')
mod('dynamic_network_architectures.architectures')
mod('dynamic_network_architectures.building_blocks')
mod('dynamic_network_architectures.architectures.unet',
    PlainConvUNet=cls('PlainConvUNet', 'dynamic_network_architectures.architectures.unet'),
    ResidualEncoderUNet=cls('ResidualEncoderUNet', 'dynamic_network_architectures.architectures.unet'))
mod('dynamic_network_architectures.building_blocks.helper',
    convert_dim_to_conv_op=lambda d: nn.Conv2d if d == 2 else nn.Conv3d,
    get_matching_instancenorm=lambda op: nn.InstanceNorm2d if op is nn.Conv2d else nn.InstanceNorm3d)

# ---- batchgenerators stub
def load_json(f):
    with open(f) as fh:
        return json.load(fh)


def save_json(obj, f, indent=4, sort_keys=True):
    with open(f, 'w') as fh:
        json.dump(obj, fh, indent=indent, sort_keys=sort_keys)


mod('batchgenerators')
mod('batchgenerators.utilities')
mod('batchgenerators.utilities.file_and_folder_operations', load_json=load_json, save_json=save_json,
    join=os.path.join, isfile=os.path.isfile, maybe_mkdir_p=lambda p: os.makedirs(p, exist_ok=True))

# ---- nnunetv2 stubs for I/O-heavy modules
TMP = tempfile.mkdtemp()
mod('nnunetv2.paths', nnUNet_raw=os.path.join(TMP, 'raw'), nnUNet_preprocessed=os.path.join(TMP, 'pre'),
    nnUNet_results=os.path.join(TMP, 'res'))
SimpleITKIO = type('SimpleITKIO', (), {})
mod('nnunetv2.imageio.reader_writer_registry',
    determine_reader_writer_from_dataset_json=lambda dj, ex=None, *a, **k: SimpleITKIO)


def resample_data_or_seg_to_shape(*a, **k):
    raise NotImplementedError


def compute_new_shape(old_shape, old_spacing, new_spacing):
    assert len(old_spacing) == len(old_shape)
    assert len(old_shape) == len(new_spacing)
    return np.array([int(round(i / j * k)) for i, j, k in zip(old_spacing, new_spacing, old_shape)])


mod('nnunetv2.preprocessing.resampling.default_resampling',
    resample_data_or_seg_to_shape=resample_data_or_seg_to_shape, compute_new_shape=compute_new_shape)
mod('nnunetv2.utilities.dataset_name_id_conversion', maybe_convert_to_dataset_name=lambda x: x)
mod('nnunetv2.utilities.default_n_proc_DA', get_allowed_n_proc_DA=lambda: 1)
mod('nnunetv2.utilities.utils',
    get_filenames_of_train_images_and_targets=lambda folder, dj: {'c0': {'images': ['c0_0000.nii.gz']}})


# ---- dna compute_conv_feature_map_size, transcribed
class FakeNet:
    def __init__(self, cls_name, kw, in_ch, out_ch):
        self.res = cls_name.endswith('ResidualEncoderUNet')
        self.kw = kw
        self.num_classes = out_ch

    def compute_conv_feature_map_size(self, input_size):
        kw = self.kw
        n = kw['n_stages']
        feats = kw['features_per_stage']
        strides = [list(s) for s in kw['strides']]
        out = np.int64(0)
        size = list(input_size)
        if self.res:
            out += np.prod([feats[0], *size], dtype=np.int64)  # stem
            in_ch = feats[0]
            for s in range(n):
                nb = kw['n_blocks_per_stage'][s]
                after = [i // j for i, j in zip(size, strides[s])]
                # BasicBlockD 0
                o = np.prod([feats[s], *after], dtype=np.int64) * 2
                if in_ch != feats[s] or any(i != j for i, j in zip(size, after)):
                    o += np.prod([feats[s], *after], dtype=np.int64)
                for _ in range(1, nb):
                    o += np.prod([feats[s], *after], dtype=np.int64) * 2
                out += o
                in_ch = feats[s]
                size = after
        else:
            for s in range(n):
                after = [i // j for i, j in zip(size, strides[s])]
                out += kw['n_conv_per_stage'][s] * np.prod([feats[s], *after], dtype=np.int64)
                size = after
        # decoder
        skip_sizes = []
        size = list(input_size)
        for s in range(n - 1):
            skip_sizes.append([i // j for i, j in zip(size, strides[s])])
            size = skip_sizes[-1]
        for s in range(n - 1):
            ss = skip_sizes[-(s + 1)]
            ch = feats[-(s + 2)]
            out += kw['n_conv_per_stage_decoder'][s] * np.prod([ch, *ss], dtype=np.int64)
            out += np.prod([ch, *ss], dtype=np.int64)
            if s == n - 2:
                out += np.prod([self.num_classes, *ss], dtype=np.int64)
        return out


mod('nnunetv2.utilities.get_network_from_plans',
    get_network_from_plans=lambda c, kw, ri, i, o, allow_init=True, deep_supervision=None: FakeNet(c, kw, i, o))

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner  # noqa
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (  # noqa
    nnUNetPlannerResEncM, nnUNetPlannerResEncL, nnUNetPlannerResEncXL)

PLANNERS = {'ExperimentPlanner': ExperimentPlanner, 'nnUNetPlannerResEncM': nnUNetPlannerResEncM,
            'nnUNetPlannerResEncL': nnUNetPlannerResEncL, 'nnUNetPlannerResEncXL': nnUNetPlannerResEncXL}


def run(name, dataset_json, fingerprint, planner, gpu=None):
    raw = os.path.join(TMP, 'raw', name)
    pre = os.path.join(TMP, 'pre', name)
    os.makedirs(raw, exist_ok=True)
    os.makedirs(pre, exist_ok=True)
    save_json(dataset_json, os.path.join(raw, 'dataset.json'))
    save_json(fingerprint, os.path.join(pre, 'dataset_fingerprint.json'))
    kw = {} if gpu is None else {'gpu_memory_target_in_gb': gpu}
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        p = PLANNERS[planner](name, **kw)
    import io, contextlib
    with contextlib.redirect_stdout(io.StringIO()):
        p.plan_experiment()
    return load_json(os.path.join(pre, p.plans_identifier + '.json'))


if __name__ == '__main__':
    # sanity: reproduce the two reference files
    ref = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       '..', '..', '..', '..', 'tests', 'fixtures', 'nnunet_examples') + os.sep
    fp = load_json(ref + 'example_dataset_fingerprint_Dataset501.json')
    dj = {'channel_names': {'0': 'CT'}, 'labels': {'background': 0, 'a': 1, 'b': 2}, 'numTraining': 12,
          'file_ending': '.nii.gz'}
    got = run('Dataset501_Synth3D', dj, fp, 'ExperimentPlanner')
    want = load_json(ref + 'example_nnUNetPlans_Dataset501.json')
    print('Dataset501 identical:', got == want)
