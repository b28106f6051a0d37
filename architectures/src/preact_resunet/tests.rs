use super::blocks::PreActRes;
use super::*;
use crate::network::LayerRow;
use crate::registry::Registry;
use crate::unet::options::{NormKind, NormOptions};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

fn plan_kwargs(
    features: &[usize],
    conv_op: &str,
    kernels: Value,
    strides: Value,
) -> Map<String, Value> {
    let dim = if conv_op.ends_with("3d") { 3 } else { 2 };
    crate::test_util::plan_kwargs(dim, features, strides, kernels)
}

fn with(mut m: Map<String, Value>, extra: Value) -> Map<String, Value> {
    for (k, v) in extra.as_object().unwrap() {
        m.insert(k.clone(), v.clone());
    }
    m
}

fn spec(kwargs: Map<String, Value>) -> plans::ArchitectureSpec {
    plans::ArchitectureSpec {
        network_class_name: "preact_resunet".into(),
        arch_kwargs: kwargs,
        kw_requires_import: vec![],
    }
}

fn io(in_channels: usize, num_classes: usize, ds: bool) -> NetworkIo {
    NetworkIo {
        in_channels,
        num_classes,
        deep_supervision: ds,
    }
}

/// The seed's 2D network: 1 → [32, 64, 128, 256], 2 classes, 3×3, max-pool 2.
fn seed_2d() -> Map<String, Value> {
    with(
        plan_kwargs(
            &[32, 64, 128, 256],
            "torch.nn.Conv2d",
            json!(3),
            json!([1, 2, 2, 2]),
        ),
        json!({"norm": "batch"}),
    )
}

fn small_3d() -> Map<String, Value> {
    plan_kwargs(
        &[4, 8, 16],
        "torch.nn.modules.conv.Conv3d",
        json!([[1, 3, 3], [3, 3, 3], [1, 3, 3]]),
        json!([[1, 1, 1], [1, 2, 2], [2, 2, 2]]),
    )
}

fn small_2d() -> Map<String, Value> {
    plan_kwargs(
        &[4, 8, 16],
        "torch.nn.modules.conv.Conv2d",
        json!(3),
        json!([[1, 1], [2, 1], [2, 2]]),
    )
}

#[test]
fn seed_2d_parameter_count_by_hand() {
    // Hand count from reference §1.5 (3×3 convs and 1×1 projections bias-free, norm = 2C):
    // enc L0 PreActRes(1→32):   BN 2 + 1·32·9=288 + BN 64 + 32·32·9=9216 + proj 32      =     9,602
    // enc L1 PreActRes(32→64):  64 + 18,432 + 128 + 36,864 + 2,048                      =    57,536
    // enc L2 PreActRes(64→128): 128 + 73,728 + 256 + 147,456 + 8,192                    =   229,760
    // enc L3 PreActRes(128→256): 256 + 294,912 + 512 + 589,824 + 32,768                 =   918,272
    // ConvNeXt(256): BN 512 + DW 256·49+256=12,800 + BN 512 + 1×1 256·256+256=65,792   =    79,616
    // up 256→128 ConvT2×2 (131,072+128) + PreActRes(256→128) 512+294,912+256+147,456+32,768
    //                                                          = 131,200 + 475,904     =   607,104
    // up 128→64 (32,768+64) + PreActRes(128→64) 256+73,728+128+36,864+8,192 = 32,832+119,168 = 152,000
    // up 64→32 (8,192+32) + PreActRes(64→32) 128+18,432+64+9,216+2,048 = 8,224+29,888  =    38,112
    // head 1×1 32→2 + bias                                                              =        66
    // total                                                                             = 2,092,068
    // deep supervision adds the heads 128→2 (258) and 64→2 (130):                  2,092,456
    let r = Registry::default();
    let s = spec(seed_2d());
    // without deep supervision the network is exactly the seed's (no low-resolution heads)
    let params = r.parameters(&s, &io(1, 2, false)).unwrap();
    assert_eq!(crate::init::count_trainable(&params), 2_092_068);
    assert!(params
        .iter()
        .all(|p| !p.name.starts_with("decoder.seg_layers.0.")
            && !p.name.starts_with("decoder.seg_layers.1.")));
    assert!(params
        .iter()
        .any(|p| p.name == "decoder.seg_layers.2.weight"));
    let with_ds = r.parameters(&s, &io(1, 2, true)).unwrap();
    assert_eq!(crate::init::count_trainable(&with_ds), 2_092_456);
    // BN running statistics exist but are buffers
    assert!(with_ds
        .iter()
        .any(|p| p.name == "encoder.stages.0.blocks.0.norm1.running_var" && !p.trainable()));
    // the network's own count and the layer table agree
    let (_, net) = r.shape_only(&s, &io(1, 2, true)).unwrap();
    let rows: u64 = net.layers(&[256, 256]).iter().map(|r| r.params).sum();
    assert_eq!(rows, 2_092_456);
    let (_, net) = r.shape_only(&s, &io(1, 2, false)).unwrap();
    let rows: u64 = net.layers(&[256, 256]).iter().map(|r| r.params).sum();
    assert_eq!(rows, 2_092_068);
}

fn out_shapes(outs: &[Tensor]) -> Vec<Vec<usize>> {
    outs.iter().map(|t| t.dims().to_vec()).collect()
}

#[test]
fn shape_grid_2d_3d_anisotropic_both_downsamplings_ds_on_off() {
    let r = Registry::default();
    type Case = (Map<String, Value>, Vec<usize>, Vec<Vec<usize>>);
    let cases: Vec<Case> = vec![
        // 3D strides [1,1,1],[1,2,2],[2,2,2]: full, /[1,2,2], /[2,4,4]
        (
            small_3d(),
            vec![4, 8, 8],
            vec![vec![4, 8, 8], vec![4, 4, 4], vec![2, 2, 2]],
        ),
        // 2D strides [1,1],[2,1],[2,2]
        (
            small_2d(),
            vec![8, 8],
            vec![vec![8, 8], vec![4, 8], vec![2, 4]],
        ),
    ];
    for (kw, patch, scales) in cases {
        for down in ["maxpool", "conv"] {
            for ds in [false, true] {
                let s = spec(with(kw.clone(), json!({"downsample": down})));
                let (_, net) = r
                    .build_initialized(&s, &io(2, 3, ds), 7, &Device::Cpu)
                    .unwrap();
                let mut shape = vec![2, 2];
                shape.extend(&patch);
                let x = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
                let outs = net.forward(&x, true).unwrap();
                let want: Vec<Vec<usize>> = scales
                    .iter()
                    .take(if ds { 2 } else { 1 })
                    .map(|sc| [vec![2, 3], sc.clone()].concat())
                    .collect();
                assert_eq!(out_shapes(&outs), want, "{down} ds={ds} patch {patch:?}");
                // eval mode too
                assert_eq!(out_shapes(&net.forward(&x, false).unwrap()), want);
                for o in &outs {
                    let v: Vec<f32> = o.flatten_all().unwrap().to_vec1().unwrap();
                    assert!(v.iter().all(|x| x.is_finite()));
                }
            }
        }
    }
}

#[test]
fn gradients_reach_every_parameter() {
    let r = Registry::default();
    // 3D anisotropic with BatchNorm + conv down + GELU, and 2D with instance norm + max-pool
    let cases = [
        (
            with(
                small_3d(),
                json!({"norm": "batch", "downsample": "conv", "activation": "gelu"}),
            ),
            vec![2, 1, 4, 8, 8],
        ),
        (
            with(
                small_2d(),
                json!({"n_blocks_per_stage": [1, 2, 1], "n_blocks_per_stage_decoder": 2}),
            ),
            vec![2, 1, 8, 8],
        ),
    ];
    for (kw, shape) in cases {
        let (varmap, net) = r
            .build_initialized(&spec(kw), &io(1, 2, true), 3, &Device::Cpu)
            .unwrap();
        let x = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
        let outs = net.forward(&x, true).unwrap();
        assert_eq!(outs.len(), 2);
        let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
        for o in &outs {
            let w = Tensor::randn(0f32, 1.0, o.dims(), &Device::Cpu).unwrap();
            loss = (loss + (o * w).unwrap().sum_all().unwrap()).unwrap();
        }
        let grads = loss.backward().unwrap();
        let data = varmap.data().lock().unwrap();
        let mut checked = 0;
        for (name, var) in data.iter() {
            if name.ends_with("running_mean") || name.ends_with("running_var") {
                continue;
            }
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let a: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(a > 0.0 && a.is_finite(), "{name}: |grad| = {a}");
            checked += 1;
        }
        // low-resolution heads included (deep supervision on)
        assert!(data.contains_key("decoder.seg_layers.0.weight"));
        assert!(checked > 30, "{checked}");
    }
}

#[test]
fn identity_or_projection_shortcut() {
    let r = Registry::default();
    // stage 1 keeps 4 channels (identity), stage 2 widens (projection); decoder first blocks
    // see 2C → C (projection), second decoder blocks C → C (identity)
    let kw = with(
        plan_kwargs(&[4, 4, 8], "torch.nn.Conv2d", json!(3), json!([1, 2, 2])),
        json!({"n_blocks_per_stage_decoder": 2}),
    );
    let names: Vec<String> = r
        .parameters(&spec(kw), &io(4, 2, false))
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    let has = |n: &str| names.iter().any(|x| x == n);
    assert!(
        !has("encoder.stages.0.blocks.0.skip.weight"),
        "4 in → 4: identity"
    );
    assert!(!has("encoder.stages.1.blocks.0.skip.weight"));
    assert!(has("encoder.stages.2.blocks.0.skip.weight"));
    assert!(has("decoder.stages.0.blocks.0.skip.weight"));
    assert!(!has("decoder.stages.0.blocks.1.skip.weight"));
    assert!(
        !has("encoder.stages.1.down.weight"),
        "max-pool has no weights"
    );

    // functional: with conv2 = 0 the block is its shortcut
    let dev = Device::Cpu;
    let norm = NormOptions {
        kind: NormKind::Instance,
        eps: 1e-5,
        affine: true,
        momentum: 0.1,
    };
    let act = crate::unet::options::Nonlin::LeakyRelu {
        negative_slope: 0.01,
    };
    for (cin, cout) in [(3usize, 3usize), (3, 5)] {
        let vm = VarMap::new();
        let vb = crate::init::seeded_init_backend(&vm, 1, DType::F32, &dev);
        let blk = PreActRes::new(cin, cout, &[3, 3], &norm, act, None, vb).unwrap();
        assert_eq!(blk.skip.is_some(), cin != cout);
        {
            let d = vm.data().lock().unwrap();
            let w = d.get("conv2.weight").unwrap();
            w.set(&w.as_tensor().zeros_like().unwrap()).unwrap();
        }
        let x = Tensor::randn(0f32, 1.0, (2, cin, 5, 6), &dev).unwrap();
        let y = blk.forward(&x, true).unwrap();
        let want = if cin == cout {
            x.clone()
        } else {
            let d = vm.data().lock().unwrap();
            let w = d
                .get("skip.weight")
                .unwrap()
                .as_tensor()
                .reshape((cout, cin))
                .unwrap();
            w.broadcast_matmul(&x.reshape((2, cin, 30)).unwrap())
                .unwrap()
                .reshape((2, cout, 5, 6))
                .unwrap()
        };
        let diff: f32 = (y - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-5, "{cin}→{cout}: {diff}");
    }
}

#[test]
fn depthwise_kernel_follows_the_plan_per_axis() {
    let r = Registry::default();
    let p = r.parameters(&spec(small_3d()), &io(1, 2, true)).unwrap();
    let dw = p
        .iter()
        .find(|p| p.name == "encoder.stages.2.convnext.dwconv.weight")
        .unwrap();
    assert_eq!(dw.shape, vec![16, 1, 1, 7, 7]);
    let kw = with(
        small_3d(),
        json!({"kernel_sizes": 3, "bottleneck_kernel": 5}),
    );
    let p = r.parameters(&spec(kw), &io(1, 2, true)).unwrap();
    let dw = p
        .iter()
        .find(|p| p.name.ends_with("convnext.dwconv.weight"))
        .unwrap();
    assert_eq!(dw.shape, vec![16, 1, 5, 5, 5]);
    let kw = with(small_3d(), json!({"convnext_bottleneck": false}));
    let p = r.parameters(&spec(kw), &io(1, 2, true)).unwrap();
    assert!(!p.iter().any(|p| p.name.contains("convnext")));
    // conv down-sampling: kernel = stride, C → C
    let kw = with(small_3d(), json!({"downsample": "conv"}));
    let p = r.parameters(&spec(kw), &io(1, 2, true)).unwrap();
    let d = p
        .iter()
        .find(|p| p.name == "encoder.stages.1.down.weight")
        .unwrap();
    assert_eq!(d.shape, vec![4, 4, 1, 2, 2]);
    assert!(!p
        .iter()
        .any(|p| p.name.starts_with("encoder.stages.0.down")));
}

fn table_elements(rows: &[LayerRow]) -> u64 {
    rows.iter()
        .map(|r| r.stored_activations as u64 * r.output_shape.iter().product::<usize>() as u64)
        .sum()
}

#[test]
fn estimate_and_layer_table_by_hand() {
    let r = Registry::default();
    // 2D [2, 4], strides [1, 2], 1 → 3 classes, patch 4×4 (16 → 4 voxels), no DS.
    // Estimator (tensors PyTorch keeps, halved):
    // L0 block 1→2 at 16 vox: (2·1 + 4·2)·16 = 160; pool 2 ch at 4 vox: 8;
    // L1 block 2→4: (2·2 + 4·4)·4 = 80; ConvNeXt 6·4·4 = 96;
    // decoder: cat 2·2·16 = 64; block 4→2: (2·4 + 4·2)·16 = 256; head 3·16 = 48  → 712 / 2
    let kw = plan_kwargs(&[2, 4], "torch.nn.Conv2d", json!(3), json!([1, 2]));
    let s = spec(kw);
    let est = r.estimate(&s, &io(1, 3, false)).unwrap();
    assert_eq!(est.conv_feature_map_size(&[4, 4]), 356);
    // Layer table (every conv / norm / act / add / pool / transp / cat output):
    // L0 block: norm1 1·16·2 = 32, conv1 2·16·3 = 96, conv2 (+proj +sum) 2·16·3 = 96 → 224
    // pool 2·4 = 8; L1 block: 2·4·2 = 16, 4·4·3 = 48, 4·4·3 = 48 → 112;
    // ConvNeXt 4·4·(2 + 3 + 2) = 112; transp 2·16 = 32; cat 4·16 = 64;
    // decoder block 4→2: 4·16·2 = 128, 2·16·3 = 96, 2·16·3 = 96 → 320; head 3·16 = 48 → 920
    let (_, net) = r.shape_only(&s, &io(1, 3, false)).unwrap();
    assert_eq!(table_elements(&net.layers(&[4, 4])), 920);
    // deep supervision adds exactly the low-resolution heads, in both counts
    // (3D, conv down, dropout, 2 blocks per stage)
    let kw = with(
        small_3d(),
        json!({"downsample": "conv", "n_blocks_per_stage": 2,
               "dropout_op": "torch.nn.Dropout3d", "dropout_op_kwargs": {"p": 0.1}}),
    );
    let s = spec(kw);
    let patch = [8, 16, 16];
    let table =
        |ds: bool| table_elements(&r.shape_only(&s, &io(2, 3, ds)).unwrap().1.layers(&patch));
    let stored = |ds: bool| {
        let cfg = PreActConfig::from_kwargs(&s.arch_kwargs, "a", &io(2, 3, ds)).unwrap();
        PreActEstimate { config: cfg }.stored_elements(&patch)
    };
    // the extra head is decoder stage 0's, at level 1 (8×8×8): 3 classes · 512
    assert_eq!(table(true) - table(false), 3 * 8 * 8 * 8);
    assert_eq!(stored(true) - stored(false), 3 * 8 * 8 * 8);
    // dropout adds one tensor per block output width
    let no_drop = {
        let mut m = s.arch_kwargs.clone();
        m.remove("dropout_op");
        m.remove("dropout_op_kwargs");
        let cfg = PreActConfig::from_kwargs(&m, "a", &io(2, 3, false)).unwrap();
        PreActEstimate { config: cfg }.stored_elements(&patch)
    };
    // blocks: enc 2×(4 ch at 8·16·16) + 2×(8 at 8·8·8) + 2×(16 at 4·4·4); dec 1×8 at 8³, 1×4 at 8·16²
    let per_block_outputs = 2 * 4 * 2048 + 2 * 8 * 512 + 2 * 16 * 64 + 8 * 512 + 4 * 2048;
    assert_eq!(stored(false) - no_drop, per_block_outputs);
}

#[test]
fn estimate_ratio_to_plain_matches_reference() {
    // reference §3: pre-act ResUNet 3D [32..256] act ×1.45 of PlainConvUNet (±35% allowed)
    let r = Registry::default();
    let kw = plan_kwargs(
        &[32, 64, 128, 256],
        "torch.nn.Conv3d",
        json!(3),
        json!([1, 2, 2, 2]),
    );
    let io = io(1, 2, false);
    let mut plain = spec(kw.clone());
    plain.network_class_name = "PlainConvUNet".into();
    let p = r
        .estimate(&plain, &io)
        .unwrap()
        .conv_feature_map_size(&[128; 3]) as f64;
    let ours = r
        .estimate(&spec(kw), &io)
        .unwrap()
        .conv_feature_map_size(&[128; 3]) as f64;
    let ratio = ours / p;
    assert!(
        (1.45 * 0.65..=1.45 * 1.35).contains(&ratio),
        "ratio {ratio}"
    );
    // and it is what the stored-tensor model gives (≈1.44), not a loose coincidence
    assert!((ratio - 1.44).abs() < 0.02, "ratio {ratio}");
}

#[test]
fn bad_kwargs_name_their_json_path() {
    let r = Registry::default();
    let err = |extra: Value| -> String {
        let s = spec(with(small_3d(), extra));
        match r.build_initialized(&s, &io(1, 2, true), 0, &Device::Cpu) {
            Ok(_) => panic!("accepted {s:?}"),
            Err(e) => e.to_string(),
        }
    };
    let e = err(json!({"downsample": "avgpool"}));
    assert!(
        e.contains("architecture.arch_kwargs.downsample") && e.contains("\"maxpool\""),
        "{e}"
    );
    let e = err(json!({"norm": "group"}));
    assert!(
        e.contains("architecture.arch_kwargs.norm: expected one of"),
        "{e}"
    );
    let e = err(json!({"activation": 3}));
    assert!(e.contains("architecture.arch_kwargs.activation"), "{e}");
    let e = err(json!({"bottleneck_kernel": 4}));
    assert!(
        e.contains("architecture.arch_kwargs.bottleneck_kernel"),
        "{e}"
    );
    let e = err(json!({"n_blocks_per_stage_decoder": [1, 1, 1]}));
    assert!(
        e.contains("n_blocks_per_stage_decoder: has 3 entries, expected 2"),
        "{e}"
    );
    let e = err(json!({"kernel_sizes": [[1, 3, 3], [3, 2, 3], [3, 3, 3]]}));
    assert!(
        e.contains("architecture.arch_kwargs.kernel_sizes[1][1]"),
        "{e}"
    );
    let e = err(json!({"downsampling": "conv"}));
    assert!(
        e.contains("architecture.arch_kwargs.downsampling: unknown argument"),
        "{e}"
    );
    let e = err(json!({"strides": [[1, 1, 1], [1, 2], [2, 2, 2]]}));
    assert!(e.contains("architecture.arch_kwargs.strides[1]"), "{e}");
    // case-insensitive choices and ResEnc keys are accepted
    let s = spec(with(
        small_3d(),
        json!({"norm": "Batch", "activation": "GELU", "block": "BasicBlockD",
               "stem_channels": null, "bottleneck_channels": null}),
    ));
    let (_, net) = r
        .build_initialized(&s, &io(1, 2, true), 0, &Device::Cpu)
        .unwrap();
    // an input that is not divisible by the stride product is a clear error
    let x = Tensor::zeros((1, 1, 4, 8, 6), DType::F32, &Device::Cpu).unwrap();
    let e = net.forward(&x, false).unwrap_err().to_string();
    assert!(e.contains("not divisible"), "{e}");
}

#[test]
fn registry_names_presets_and_deep_supervision_toggle() {
    let r = Registry::default();
    for n in [PREACT_RESUNET, "PreActResUNet", "preact_resunet"] {
        assert_eq!(r.get(n).unwrap().name(), PREACT_RESUNET);
    }
    let presets: Vec<ArchPreset> = r
        .presets()
        .into_iter()
        .filter(|(a, _)| a == PREACT_RESUNET)
        .map(|(_, p)| p)
        .collect();
    assert!(presets.iter().any(|p| p.name == "preact_resunet"));
    for p in &presets {
        // merged over a plain 3D plan the preset builds
        let mut kw = small_3d();
        kw.extend(p.kwargs.clone());
        let cfg = PreActConfig::from_kwargs(&kw, "a", &io(1, 2, true)).unwrap();
        assert_eq!(cfg.bottleneck_kernel, 7);
        assert_eq!(
            cfg.norm.kind == NormKind::Batch,
            p.name.ends_with("_bn"),
            "{}",
            p.name
        );
    }
    // default norm follows the plan (instance), activation the plan's LeakyReLU
    let cfg = PreActConfig::from_kwargs(&small_3d(), "a", &io(1, 2, true)).unwrap();
    assert_eq!(cfg.norm.kind, NormKind::Instance);
    assert!(cfg.norm.affine);
    assert_eq!(cfg.downsample, Downsample::MaxPool);
    let (_, mut net) = r
        .build_initialized(&spec(small_2d()), &io(1, 2, true), 0, &Device::Cpu)
        .unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 1, 8, 8), &Device::Cpu).unwrap();
    assert_eq!(net.forward(&x, false).unwrap().len(), 2);
    net.set_deep_supervision(false);
    assert!(!net.deep_supervision());
    assert_eq!(net.forward(&x, false).unwrap().len(), 1);
    assert_eq!(net.spatial_dims(), 2);
}
