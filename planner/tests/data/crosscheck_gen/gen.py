import json, os, random, sys
import numpy as np
sys.argv = sys.argv[:1]
import harness

rng = random.Random(20260713)
CH = ['CT', 'T2', 'MRI', 'nonorm', 'rescale_to_0_1', 'ADC']
out = []
for k in range(60):
    n = rng.randint(1, 30)
    is2d = rng.random() < 0.12
    planner = rng.choice(list(harness.PLANNERS))
    gpu = None if rng.random() < 0.7 else rng.choice([4, 6, 11, 16, 24, 48])
    if is2d:
        base = rng.choice([1.0, 0.5, 0.25])
        spacings = [[999.0, base, base] for _ in range(n)]
        shapes = [[1, rng.randint(40, 1500), rng.randint(40, 1500)] for _ in range(n)]
    else:
        inplane = rng.choice([0.8, 0.800000011920929, 0.7031, 1.0, 1.5, 0.4, 0.9765625])
        aniso = rng.choice([1.0, 1.0, 1.25, 2.5, 3.0, 4.0, 5.0, 7.0])
        lowaxis = rng.choice([0, 0, 2, 1])
        size_in = rng.randint(30, 600)
        size_low = max(4, int(size_in / (aniso * rng.uniform(0.5, 2.0))))
        jitter = rng.random() < 0.6
        spacings, shapes = [], []
        for i in range(n):
            sp = [inplane] * 3
            sh = [size_in] * 3
            sp[lowaxis] = inplane * aniso * (rng.choice([1, 1.25, 1.5, 0.8]) if jitter else 1)
            sh[lowaxis] = size_low
            if jitter:
                sh = [max(2, int(v * rng.uniform(0.6, 1.4))) for v in sh]
                f = rng.choice([1.0, 1.0, 0.9, 1.1])
                sp = [v * f for v in sp]
            spacings.append(sp)
            shapes.append(sh)
    nch = rng.randint(1, 3)
    chans = {str(i): rng.choice(CH) for i in range(nch)}
    nlab = rng.randint(2, 5)
    labels = {'background': 0, **{f'l{i}': i for i in range(1, nlab)}}
    dj = {'channel_names': chans, 'labels': labels, 'numTraining': n if rng.random() < 0.8 else rng.randint(1, 200),
          'file_ending': '.nii.gz'}
    fp = {'foreground_intensity_properties_per_channel': {str(i): {'max': 1.0, 'mean': 0.5, 'median': 0.5, 'min': 0.0,
            'percentile_00_5': 0.01, 'percentile_99_5': 0.99, 'std': 0.2} for i in range(nch)},
          'median_relative_size_after_cropping': rng.choice([0.5, 0.74, 0.75, 0.9, 1.0]),
          'shapes_after_crop': shapes, 'spacings': spacings}
    name = f'Dataset{700 + k}_X'
    try:
        exp = harness.run(name, dj, fp, planner, gpu)
    except Exception as e:
        print('skip', k, type(e).__name__, e)
        continue
    out.append({'name': name, 'planner': planner, 'gpu': gpu, 'dataset_json': dj, 'fingerprint': fp, 'expected': exp})
    cfgs = exp['configurations']
    print(k, planner, gpu, list(cfgs), {c: (cfgs[c].get('patch_size'), cfgs[c].get('batch_size')) for c in cfgs if 'patch_size' in cfgs[c]})
json.dump(out, open(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..',
                                  'crosscheck_nnunet281.json'), 'w'))
print(len(out))
