use super::*;
use serde_json::json;

const D501: &str = include_str!("../testdata/example_nnUNetPlans_Dataset501.json");
const LIVER: &str = include_str!("../testdata/example_nnUNetPlans_FakeLiver_cascade.json");
const FIX3D: &str = include_str!("../testdata/plans_fixture3d.json");
const FIX2D: &str = include_str!("../testdata/plans_fixture2d.json");

fn value(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

fn plans(text: &str) -> Plans {
    Plans::from_value(&value(text), "test").unwrap()
}

/// Dataset501 plans with an edit applied to the raw JSON.
fn d501_with(edit: impl FnOnce(&mut Value)) -> Plans {
    let mut v = value(D501);
    edit(&mut v);
    Plans::from_value(&v, "nnUNetPlans.json").unwrap()
}

fn cfg_err(p: &Plans, name: &str) -> String {
    match p.configuration(name) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
    }
}

fn add_bs4(v: &mut Value) {
    v["configurations"]["3d_fullres_bs4"] = json!({"inherits_from": "3d_fullres", "batch_size": 4});
}

#[test]
fn real_files_round_trip_byte_for_byte() {
    for text in [D501, LIVER, FIX3D, FIX2D] {
        let p = plans(text);
        let out = io::to_json_string(&p).unwrap();
        assert_eq!(value(&out), value(text));
        assert_eq!(out, text, "saved text differs from nnU-Net's");
        let again = Plans::from_value(&value(&out), "again").unwrap();
        assert_eq!(again, p);
    }
}

#[test]
fn save_and_load_through_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nnUNetPlans.json");
    let p = plans(LIVER);
    p.save(&path).unwrap();
    let loaded = Plans::load(&path).unwrap();
    assert_eq!(loaded, p);
    let (_, cfg) = Plans::load_configuration(&path, "3d_lowres").unwrap();
    assert_eq!(cfg.next_stage.as_deref(), Some("3d_cascade_fullres"));
    let err = Plans::load_configuration(&path, "3d_nope")
        .unwrap_err()
        .to_string();
    assert_contains(
        &err,
        &[
            &path.display().to_string(),
            "unknown configuration `3d_nope`",
        ],
    );
}

#[test]
fn every_configuration_of_the_real_files_validates() {
    for text in [D501, LIVER, FIX3D, FIX2D] {
        let p = plans(text);
        p.validate_all().unwrap();
        for n in p.configuration_names() {
            let c = p.configuration(&n).unwrap();
            assert!(c.dim() == 2 || c.dim() == 3);
        }
    }
}

#[test]
fn typed_values_of_dataset501() {
    let p = plans(D501);
    assert_eq!(p.dataset_name, "Dataset501_Synth3D");
    assert_eq!(p.original_median_shape_after_transp, vec![25.0, 97.0, 94.0]);
    assert_eq!(p.transpose_backward, vec![0, 1, 2]);
    assert_eq!(p.configuration_names(), vec!["2d", "3d_fullres"]);
    assert!(
        (p.foreground_intensity_properties_per_channel["0"].percentile_99_5 - 242.05740356445312)
            .abs()
            < 1e-12
    );
    let c = p.configuration("3d_fullres").unwrap();
    assert_eq!(c.batch_size, 2);
    assert_eq!(c.patch_size, vec![32, 112, 96]);
    assert_eq!(c.median_image_size_in_voxels, vec![30.0, 97.0, 93.5]);
    assert_eq!(c.spacing, vec![3.0, 0.800000011920929, 0.800000011920929]);
    assert_eq!(c.normalization_schemes, vec![NormalizationScheme::Ct]);
    assert_eq!(c.resampling_fn_data_kwargs, ResamplingKwargs::data());
    assert_eq!(c.resampling_fn_seg_kwargs, ResamplingKwargs::seg());
    assert_eq!(
        c.resampling_fn_probabilities_kwargs,
        ResamplingKwargs::probabilities()
    );
    assert!(!c.batch_dice);
    assert!(c.extra.is_empty());
    let a = &c.architecture;
    assert_eq!(a.short_class_name(), "PlainConvUNet");
    assert!(a.is_dna_unet());
    assert_eq!(a.n_stages().unwrap(), 5);
    assert_eq!(a.features_per_stage().unwrap(), vec![32, 64, 128, 256, 320]);
    assert_eq!(a.kernel_sizes(3).unwrap()[0], vec![1, 3, 3]);
    assert_eq!(a.strides(3).unwrap()[1], vec![1, 2, 2]);
    assert_eq!(a.n_conv_per_stage().unwrap(), vec![2; 5]);
    assert_eq!(a.n_conv_per_stage_decoder().unwrap(), vec![2; 4]);
    assert!(a.conv_bias().unwrap());
    assert_eq!(a.conv_dim(), Some(3));
    assert_eq!(
        a.kw_requires_import,
        vec!["conv_op", "norm_op", "dropout_op", "nonlin"]
    );
    assert_eq!(a.str_arg("dropout_op").unwrap(), None);
    assert!(a
        .n_blocks_per_stage()
        .unwrap_err()
        .to_string()
        .contains("missing key `n_blocks_per_stage`"));
    let c2 = p.configuration("2d").unwrap();
    assert_eq!(c2.patch_size, vec![112, 96]);
    assert!(c2.batch_dice);
    assert_eq!(c2.architecture.conv_dim(), Some(2));
}

#[test]
fn cascade_inherits_from_3d_fullres() {
    let p = plans(LIVER);
    let full = p.configuration("3d_fullres").unwrap();
    let casc = p.configuration("3d_cascade_fullres").unwrap();
    assert_eq!(casc.previous_stage.as_deref(), Some("3d_lowres"));
    assert_eq!(casc.patch_size, full.patch_size);
    assert_eq!(casc.data_identifier, full.data_identifier);
    let mut f2 = full.clone();
    f2.previous_stage = Some("3d_lowres".into());
    assert_eq!(casc, f2);
    // The raw entry is preserved as written.
    assert_eq!(
        p.configurations["3d_cascade_fullres"],
        json!({"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"})
    );
    assert!(!p
        .resolved_configuration_json("3d_cascade_fullres")
        .unwrap()
        .contains_key("inherits_from"));
}

#[test]
fn bs4_override_and_preserved_on_save() {
    let p = d501_with(add_bs4);
    let c = p.configuration("3d_fullres_bs4").unwrap();
    assert_eq!(c.batch_size, 4);
    let mut expect = p.configuration("3d_fullres").unwrap();
    expect.batch_size = 4;
    assert_eq!(c, expect);
    let out = value(&io::to_json_string(&p).unwrap());
    assert_eq!(
        out["configurations"]["3d_fullres_bs4"],
        json!({"inherits_from": "3d_fullres", "batch_size": 4})
    );
}

#[test]
fn inheritance_chain_overrides_in_order() {
    let p = d501_with(|v| {
        v["configurations"]["a"] =
            json!({"inherits_from": "3d_fullres", "batch_size": 4, "patch_size": [32, 96, 96]});
        v["configurations"]["b"] = json!({"inherits_from": "a", "batch_size": 6});
    });
    let b = p.configuration("b").unwrap();
    assert_eq!(b.batch_size, 6);
    assert_eq!(b.patch_size, vec![32, 96, 96]);
    assert_eq!(b.spacing, p.configuration("3d_fullres").unwrap().spacing);
    assert_eq!(p.configuration("a").unwrap().batch_size, 4);
}

#[test]
fn inheritance_cycle_is_named() {
    let p = d501_with(|v| {
        v["configurations"]["a"] = json!({"inherits_from": "b", "batch_size": 4});
        v["configurations"]["b"] = json!({"inherits_from": "c"});
        v["configurations"]["c"] = json!({"inherits_from": "a"});
        v["configurations"]["self"] = json!({"inherits_from": "self"});
    });
    assert_contains(&cfg_err(&p, "a"), &["inherits_from cycle: a → b → c → a"]);
    assert_contains(&cfg_err(&p, "c"), &["cycle: c → a → b → c"]);
    assert_contains(&cfg_err(&p, "self"), &["cycle: self → self"]);
    assert!(p.validate_all().is_err());
}

#[test]
fn missing_parent_and_unknown_configuration() {
    let p = d501_with(|v| v["configurations"]["x"] = json!({"inherits_from": "3d_fulres"}));
    assert_contains(
        &cfg_err(&p, "x"),
        &[
            "configurations.x.inherits_from",
            "`3d_fulres` does not exist",
            "`2d`, `3d_fullres`, `x`",
        ],
    );
    assert_contains(
        &cfg_err(&p, "3d_lowres"),
        &[
            "unknown configuration `3d_lowres`",
            "available configurations: `2d`, `3d_fullres`",
        ],
    );
    let bad_type = Plans::from_value(
        &{
            let mut v = value(D501);
            v["configurations"]["x"] = json!({"inherits_from": 3});
            v
        },
        "f.json",
    )
    .unwrap_err()
    .to_string();
    assert_contains(
        &bad_type,
        &[
            "f.json",
            "configurations.x.inherits_from: expected a string, got 3",
        ],
    );
}

#[test]
fn missing_key_names_the_chain() {
    let p = d501_with(|v| {
        add_bs4(v);
        v["configurations"]["3d_fullres"]
            .as_object_mut()
            .unwrap()
            .remove("patch_size");
    });
    let msg = cfg_err(&p, "3d_fullres_bs4");
    assert_contains(
        &msg,
        &["nnUNetPlans.json (Dataset501_Synth3D)", "missing key `patch_size` in configurations.3d_fullres (after resolving inherits_from 3d_fullres_bs4 → 3d_fullres)"],
    );
    let direct = cfg_err(&p, "3d_fullres");
    assert_contains(
        &direct,
        &["missing key `patch_size` in configurations.3d_fullres"],
    );
    assert!(!direct.contains("inherits_from"), "{direct}");
}

#[test]
fn missing_key_mentions_a_near_miss() {
    let p = d501_with(|v| {
        let c = v["configurations"]["2d"].as_object_mut().unwrap();
        let ps = c.remove("patch_size").unwrap();
        c.insert("patchsize".into(), ps);
    });
    // A near-miss key is reported as misspelled first.
    assert_contains(
        &cfg_err(&p, "2d"),
        &["unknown key `patchsize` in configurations.2d: did you mean `patch_size`?"],
    );
}

#[test]
fn misspelled_configuration_key_suggests() {
    let p = d501_with(|v| {
        v["configurations"]["3d_fullres_bs4"] =
            json!({"inherits_from": "3d_fullres", "batch_sise": 4})
    });
    assert_contains(
        &cfg_err(&p, "3d_fullres_bs4"),
        &["unknown key `batch_sise` in configurations.3d_fullres_bs4: did you mean `batch_size`?"],
    );
    let p = d501_with(|v| {
        v["configurations"]["x"] = json!({"inherit_from": "3d_fullres", "batch_size": 4})
    });
    assert_contains(
        &cfg_err(&p, "x"),
        &["unknown key `inherit_from` in configurations.x: did you mean `inherits_from`?"],
    );
    let p = d501_with(|v| {
        v["configurations"]["x"] = json!({"inherits_from": "3d_fullres", "Batch-Size": 4})
    });
    assert_contains(
        &cfg_err(&p, "x"),
        &["`Batch-Size`", "did you mean `batch_size`?"],
    );
    let p = d501_with(|v| {
        v["configurations"]["x"] =
            json!({"inherits_from": "3d_fullres", "normalisation_schemes": ["ZScoreNormalization"]})
    });
    assert_contains(
        &cfg_err(&p, "x"),
        &["did you mean `normalization_schemes`?"],
    );
    // A key that resembles nothing is kept (nnU-Net tolerates extra keys).
    let p = d501_with(|v| {
        v["configurations"]["x"] =
            json!({"inherits_from": "3d_fullres", "use_mask_for_normalization": [true]})
    });
    assert_eq!(p.configuration("x").unwrap().extra.len(), 1);
}

#[test]
fn unknown_far_keys_are_kept() {
    let p = d501_with(|v| {
        v["configurations"]["3d_fullres"]["my_comment"] = json!("tuned by hand");
        v["configurations"]["x"] =
            json!({"inherits_from": "3d_fullres", "experiment_tag": {"a": 1}});
        v["my_top_level_note"] = json!([1, 2]);
    });
    let c = p.configuration("x").unwrap();
    assert_eq!(c.extra.get("my_comment"), Some(&json!("tuned by hand")));
    assert_eq!(c.extra.get("experiment_tag"), Some(&json!({"a": 1})));
    assert_eq!(p.extra.get("my_top_level_note"), Some(&json!([1, 2])));
    let mut p2 = p.clone();
    p2.set_configuration("y", &c);
    let y = p2.configuration("y").unwrap();
    assert_eq!(y, c);
    let out = value(&io::to_json_string(&p2).unwrap());
    assert_eq!(
        out["configurations"]["y"]["experiment_tag"],
        json!({"a": 1})
    );
    assert_eq!(out["my_top_level_note"], json!([1, 2]));
    assert!(out["configurations"]["y"].get("inherits_from").is_none());
}

#[test]
fn set_configuration_writes_full_json_in_place() {
    let mut p = plans(LIVER);
    let original = p.configurations["3d_fullres"].clone();
    let mut c = p.configuration("3d_fullres").unwrap();
    p.set_configuration("3d_fullres", &c);
    assert_eq!(p.configurations["3d_fullres"], original);
    assert_eq!(
        io::to_json_string(&p).unwrap(),
        LIVER,
        "re-setting an unchanged configuration changes nothing"
    );
    c.batch_size = 7;
    p.set_configuration("3d_fullres", &c);
    assert_eq!(
        p.configuration_names(),
        vec!["2d", "3d_lowres", "3d_fullres", "3d_cascade_fullres"]
    );
    // The cascade inherits the new value.
    assert_eq!(p.configuration("3d_cascade_fullres").unwrap().batch_size, 7);
    let lowres = p.configuration("3d_lowres").unwrap();
    p.set_configuration("3d_lowres_copy", &lowres);
    assert_eq!(p.configuration("3d_lowres_copy").unwrap(), lowres);
    assert_eq!(
        p.configurations["3d_lowres_copy"]["next_stage"],
        json!("3d_cascade_fullres")
    );
}

#[test]
fn type_errors_have_json_paths() {
    let p = d501_with(|v| v["configurations"]["2d"]["batch_size"] = json!("four"));
    assert_contains(
        &cfg_err(&p, "2d"),
        &["configurations.2d.batch_size: expected a positive integer, got \"four\""],
    );
    let p = d501_with(|v| v["configurations"]["2d"]["batch_size"] = json!(0));
    assert_contains(
        &cfg_err(&p, "2d"),
        &["configurations.2d.batch_size: expected a positive integer, got 0"],
    );
    let p = d501_with(|v| {
        add_bs4(v);
        v["configurations"]["3d_fullres_bs4"]["patch_size"] = json!([32, "112", 96]);
    });
    assert_contains(
        &cfg_err(&p, "3d_fullres_bs4"),
        &["configurations.3d_fullres_bs4.patch_size[1]: expected a positive integer, got \"112\""],
    );
    let p = d501_with(|v| v["configurations"]["3d_fullres"]["spacing"] = json!([3.0, -0.8, 0.8]));
    assert_contains(
        &cfg_err(&p, "3d_fullres"),
        &["configurations.3d_fullres.spacing[1]: expected a positive number, got -0.8"],
    );
    let p = d501_with(|v| v["configurations"]["3d_fullres"]["use_mask_for_norm"] = json!(["no"]));
    assert_contains(
        &cfg_err(&p, "3d_fullres"),
        &["configurations.3d_fullres.use_mask_for_norm[0]: expected a boolean"],
    );
    let p = d501_with(|v| v["configurations"]["3d_fullres"]["batch_dice"] = json!(1));
    assert_contains(
        &cfg_err(&p, "3d_fullres"),
        &["configurations.3d_fullres.batch_dice: expected a boolean (true or false), got 1"],
    );
    let p = d501_with(|v| {
        v["configurations"]["3d_fullres"]["resampling_fn_seg_kwargs"]["order"] = json!(7)
    });
    assert_contains(&cfg_err(&p, "3d_fullres"), &["configurations.3d_fullres.resampling_fn_seg_kwargs.order: expected an interpolation order 0..=5, got 7"]);
    let p = d501_with(|v| {
        v["configurations"]["3d_fullres"]["resampling_fn_seg_kwargs"]["force_separate_z"] =
            json!("yes")
    });
    assert_contains(
        &cfg_err(&p, "3d_fullres"),
        &["resampling_fn_seg_kwargs.force_separate_z: expected true, false or null"],
    );
    // An integral float is accepted for integers.
    let p = d501_with(|v| v["configurations"]["3d_fullres"]["batch_size"] = json!(3.0));
    assert_eq!(p.configuration("3d_fullres").unwrap().batch_size, 3);
}

#[test]
fn closed_objects_reject_unknown_keys() {
    let p = d501_with(|v| {
        let kw = v["configurations"]["3d_fullres"]["resampling_fn_data_kwargs"]
            .as_object_mut()
            .unwrap();
        let x = kw.remove("force_separate_z").unwrap();
        kw.insert("forced_separate_z".into(), x);
    });
    assert_contains(
        &cfg_err(&p, "3d_fullres"),
        &["unknown key `forced_separate_z` in configurations.3d_fullres.resampling_fn_data_kwargs: did you mean `force_separate_z`?"],
    );
    let p = d501_with(|v| {
        v["configurations"]["3d_fullres"]["resampling_fn_data_kwargs"]
            ["separate_z_anisotropy_threshold"] = json!(3)
    });
    assert_contains(
        &cfg_err(&p, "3d_fullres"),
        &[
            "unknown key `separate_z_anisotropy_threshold`",
            "allowed keys: is_seg, order, order_z, force_separate_z",
        ],
    );
    let p = d501_with(|v| {
        v["configurations"]["3d_fullres"]["architecture"]["network_class"] = json!("x")
    });
    assert_contains(
        &cfg_err(&p, "3d_fullres"),
        &["configurations.3d_fullres.architecture", "`network_class`"],
    );
}

#[test]
fn shape_length_mismatches() {
    let p = d501_with(|v| v["configurations"]["3d_fullres"]["spacing"] = json!([0.8, 0.8]));
    assert_contains(&cfg_err(&p, "3d_fullres"), &["configurations.3d_fullres.spacing: invalid value [0.8, 0.8]: needs 3 entries, like patch_size [32, 112, 96]"]);
    let p = d501_with(|v| {
        v["configurations"]["3d_fullres"]["median_image_size_in_voxels"] = json!([30.0, 97.0])
    });
    assert_contains(
        &cfg_err(&p, "3d_fullres"),
        &[
            "configurations.3d_fullres.median_image_size_in_voxels",
            "needs 3 entries",
        ],
    );
    let p =
        d501_with(|v| v["configurations"]["3d_fullres"]["patch_size"] = json!([4, 32, 112, 96]));
    assert_contains(
        &cfg_err(&p, "3d_fullres"),
        &[
            "configurations.3d_fullres.patch_size",
            "needs 2 (2D) or 3 (3D) entries",
        ],
    );
}

#[test]
fn architecture_list_lengths() {
    let p = d501_with(|v| {
        v["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["kernel_sizes"]
            .as_array_mut()
            .unwrap()
            .pop();
    });
    assert_contains(
        &cfg_err(&p, "3d_fullres"),
        &[
            "configurations.3d_fullres.architecture.arch_kwargs.kernel_sizes",
            "needs 5 entries (one per stage, n_stages = 5), got 4",
        ],
    );
    let p = d501_with(|v| {
        v["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["strides"][2] =
            json!([2, 2])
    });
    assert_contains(
        &cfg_err(&p, "3d_fullres"),
        &[
            "configurations.3d_fullres.architecture.arch_kwargs.strides[2]",
            "needs 3 entries (one per spatial axis of the 3D patch_size), got 2",
        ],
    );
    let p = d501_with(|v| {
        v["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] =
            json!([32, 64, 128, 256])
    });
    assert_contains(
        &cfg_err(&p, "3d_fullres"),
        &[
            "arch_kwargs.features_per_stage",
            "needs 5 entries (one per stage), got 4",
        ],
    );
    let p = d501_with(|v| {
        v["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
            ["n_conv_per_stage_decoder"] = json!([2, 2, 2, 2, 2])
    });
    assert_contains(
        &cfg_err(&p, "3d_fullres"),
        &[
            "arch_kwargs.n_conv_per_stage_decoder",
            "needs 4 entries (one per stage), got 5",
        ],
    );
    let p = d501_with(|v| {
        v["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["n_conv_per_stage"][3] =
            json!(0)
    });
    assert_contains(
        &cfg_err(&p, "3d_fullres"),
        &["arch_kwargs.n_conv_per_stage[3]: expected a positive integer, got 0"],
    );
    let p = d501_with(|v| {
        v["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
            .as_object_mut()
            .unwrap()
            .remove("n_conv_per_stage");
    });
    assert_contains(
        &cfg_err(&p, "3d_fullres"),
        &[
            "missing key `n_conv_per_stage` in configurations.3d_fullres.architecture.arch_kwargs",
            "PlainConvUNet",
        ],
    );
    let p = d501_with(|v| {
        v["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["conv_op"] =
            json!("torch.nn.modules.conv.Conv2d")
    });
    assert_contains(
        &cfg_err(&p, "3d_fullres"),
        &["arch_kwargs.conv_op", "a 3D operation is needed"],
    );
}

#[test]
fn patch_must_be_divisible_by_strides() {
    let p = d501_with(|v| {
        add_bs4(v);
        v["configurations"]["3d_fullres_bs4"]["patch_size"] = json!([32, 112, 100]);
    });
    assert_contains(
        &cfg_err(&p, "3d_fullres_bs4"),
        &["configurations.3d_fullres_bs4.patch_size[2]: invalid value 100: must be divisible by 16", "axis 2 (1×2×2×2×2", "e.g. 96 or 112"],
    );
}

#[test]
fn scalar_arch_kwargs_are_expanded() {
    let p = d501_with(|v| {
        let kw = &mut v["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"];
        kw["n_conv_per_stage"] = json!(2);
        kw["kernel_sizes"] = json!(3);
        kw["strides"] = json!([1, 2, [1, 2, 2], 2, 2]);
        v["configurations"]["3d_fullres"]["patch_size"] = json!([16, 32, 32]);
    });
    let c = p.configuration("3d_fullres").unwrap();
    let a = &c.architecture;
    assert_eq!(a.n_conv_per_stage().unwrap(), vec![2; 5]);
    assert_eq!(a.kernel_sizes(3).unwrap(), vec![vec![3, 3, 3]; 5]);
    assert_eq!(a.strides(3).unwrap()[2], vec![1, 2, 2]);
    assert_eq!(a.strides(3).unwrap()[1], vec![2, 2, 2]);
}

#[test]
fn residual_encoder_and_custom_architectures() {
    let p = d501_with(|v| {
        let arch = &mut v["configurations"]["3d_fullres"]["architecture"];
        arch["network_class_name"] =
            json!("dynamic_network_architectures.architectures.unet.ResidualEncoderUNet");
        let kw = arch["arch_kwargs"].as_object_mut().unwrap();
        kw.remove("n_conv_per_stage");
        kw.insert("n_blocks_per_stage".into(), json!([1, 3, 4, 6, 6]));
        v["configurations"]["custom"] = json!({"inherits_from": "2d", "architecture": {
            "network_class_name": "nnseg.KiUNet", "arch_kwargs": {"features": [4, 8, 16, 32]}, "_kw_requires_import": []}});
    });
    let c = p.configuration("3d_fullres").unwrap();
    assert_eq!(
        c.architecture.n_blocks_per_stage().unwrap(),
        vec![1, 3, 4, 6, 6]
    );
    let custom = p.configuration("custom").unwrap();
    assert!(!custom.architecture.is_dna_unet());
    assert!(custom.architecture.n_stages().is_err());
}

#[test]
fn semantic_name_checks() {
    let p = d501_with(|v| {
        v["configurations"]["2d"]["normalization_schemes"] = json!(["CTnormalisation"])
    });
    assert_contains(
        &cfg_err(&p, "2d"),
        &[
            "configurations.2d.normalization_schemes[0]: invalid value \"CTnormalisation\"",
            "`ZScoreNormalization`",
            "did you mean `CTNormalization`?",
        ],
    );
    let p = d501_with(|v| v["configurations"]["2d"]["use_mask_for_norm"] = json!([false, true]));
    assert_contains(
        &cfg_err(&p, "2d"),
        &[
            "configurations.2d.use_mask_for_norm",
            "one entry per normalization scheme (1 entries",
        ],
    );
    let p = d501_with(|v| {
        v["configurations"]["2d"]["resampling_fn_seg"] = json!("resample_torch_fornnunet")
    });
    assert_contains(
        &cfg_err(&p, "2d"),
        &[
            "configurations.2d.resampling_fn_seg",
            "known resampling functions: `resample_data_or_seg_to_shape`",
        ],
    );
    let p = d501_with(|v| v["configurations"]["2d"]["next_stage"] = json!("3d_lowres"));
    assert_contains(
        &cfg_err(&p, "2d"),
        &[
            "configurations.2d.next_stage: invalid value \"3d_lowres\"",
            "`2d`, `3d_fullres`",
        ],
    );
}

#[test]
fn top_level_checks() {
    let mut v = value(D501);
    let o = v.as_object_mut().unwrap();
    let x = o.remove("transpose_forward").unwrap();
    o.insert("transpose_foward".into(), x);
    let e = Plans::from_value(&v, "p.json").unwrap_err().to_string();
    assert_contains(&e, &["p.json: unknown key `transpose_foward` in the top-level object: did you mean `transpose_forward`?"]);

    let mut v = value(D501);
    v.as_object_mut().unwrap().remove("label_manager");
    let e = Plans::from_value(&v, "p.json").unwrap_err().to_string();
    assert_contains(&e, &["missing key `label_manager` in the top-level object"]);

    let mut v = value(D501);
    v["transpose_forward"] = json!([2, 0, 1]);
    let e = Plans::from_value(&v, "p.json").unwrap_err().to_string();
    assert_contains(&e, &["transpose_backward: invalid value [0, 1, 2]: must be the inverse of transpose_forward [2, 0, 1], i.e. [1, 2, 0]"]);
    v["transpose_backward"] = json!([1, 2, 0]);
    Plans::from_value(&v, "p.json").unwrap();

    let mut v = value(D501);
    v["foreground_intensity_properties_per_channel"]["0"]["mean"] = json!("high");
    let e = Plans::from_value(&v, "p.json").unwrap_err().to_string();
    assert_contains(
        &e,
        &["foreground_intensity_properties_per_channel.0.mean: expected a number, got \"high\""],
    );

    let e = Plans::from_value(&json!([1]), "p.json")
        .unwrap_err()
        .to_string();
    assert_contains(&e, &["p.json", "expected a JSON object, got [1]"]);
}

#[test]
fn old_style_plans_are_converted() {
    let p = d501_with(|v| {
        let mut c = v["configurations"]["3d_fullres"]
            .as_object()
            .unwrap()
            .clone();
        let arch = c.remove("architecture").unwrap();
        let kw = &arch["arch_kwargs"];
        c.insert("UNet_class_name".into(), json!("PlainConvUNet"));
        c.insert("UNet_base_num_features".into(), json!(32));
        c.insert("unet_max_num_features".into(), json!(320));
        c.insert(
            "n_conv_per_stage_encoder".into(),
            kw["n_conv_per_stage"].clone(),
        );
        c.insert(
            "n_conv_per_stage_decoder".into(),
            kw["n_conv_per_stage_decoder"].clone(),
        );
        c.insert("num_pool_per_axis".into(), json!([3, 4, 4]));
        c.insert("pool_op_kernel_sizes".into(), kw["strides"].clone());
        c.insert("conv_kernel_sizes".into(), kw["kernel_sizes"].clone());
        v["configurations"]["old"] = Value::Object(c);
        v["configurations"]["old_res"] =
            json!({"inherits_from": "old", "UNet_class_name": "ResidualEncoderUNet"});
        v["configurations"]["old_bad"] =
            json!({"inherits_from": "old", "UNet_class_name": "FancyNet"});
    });
    let new = p.configuration("3d_fullres").unwrap();
    let old = p.configuration("old").unwrap();
    assert_eq!(
        old, new,
        "conversion rebuilds nnU-Net's architecture entry exactly"
    );
    let res = p.configuration("old_res").unwrap();
    assert_eq!(
        res.architecture.network_class_name,
        "dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet"
    );
    assert_eq!(res.architecture.n_blocks_per_stage().unwrap(), vec![2; 5]);
    assert_contains(
        &cfg_err(&p, "old_bad"),
        &[
            "configurations.old_bad.UNet_class_name: invalid value \"FancyNet\"",
            "`PlainConvUNet`",
        ],
    );
    let p = d501_with(|v| {
        v["configurations"]["old"] =
            json!({"UNet_class_name": "PlainConvUNet", "patch_size": [32, 32]})
    });
    assert_contains(&cfg_err(&p, "old"), &["missing key `n_conv_per_stage_encoder` in configurations.old (needed to convert old-style plans)"]);
}

#[test]
fn legacy_variants_are_accepted() {
    let mut v = value(D501);
    let o = v.as_object_mut().unwrap();
    let x = o
        .remove("foreground_intensity_properties_per_channel")
        .unwrap();
    o.insert("foreground_intensity_properties_by_modality".into(), x);
    v["configurations"]["3d_fullres"]["next_stage"] = json!(["2d"]);
    let p = Plans::from_value(&v, "p").unwrap();
    assert_eq!(
        p.foreground_intensity_properties_per_channel,
        plans(D501).foreground_intensity_properties_per_channel
    );
    assert!(p.extra.is_empty());
    assert_eq!(
        p.configuration("3d_fullres").unwrap().next_stage.as_deref(),
        Some("2d")
    );
    v["configurations"]["3d_fullres"]["next_stage"] = json!(["2d", "3d_fullres"]);
    let p = Plans::from_value(&v, "p").unwrap();
    assert_contains(
        &cfg_err(&p, "3d_fullres"),
        &[
            "configurations.3d_fullres.next_stage",
            "multiple next stages are not supported",
        ],
    );
}

#[test]
fn serde_entry_points_validate() {
    let p: Plans = serde_json::from_str(D501).unwrap();
    assert_eq!(p, plans(D501));
    let cfg_json = serde_json::to_string(&p.configuration("2d").unwrap()).unwrap();
    let c: Configuration = serde_json::from_str(&cfg_json).unwrap();
    assert_eq!(c, p.configuration("2d").unwrap());
    c.validate().unwrap();
    let mut bad = value(&cfg_json);
    bad["patch_size"] = json!([112, 97]);
    let e = serde_json::from_value::<Configuration>(bad)
        .unwrap_err()
        .to_string();
    assert_contains(&e, &["patch_size[1]", "divisible by 16"]);
    let kw: ResamplingKwargs = serde_json::from_value(
        json!({"is_seg": true, "order": 1, "order_z": 0, "force_separate_z": false}),
    )
    .unwrap();
    assert_eq!(kw.force_separate_z, Some(false));
}

#[test]
fn in_memory_configuration_validation() {
    let mut c = plans(D501).configuration("3d_fullres").unwrap();
    c.validate().unwrap();
    c.use_mask_for_norm.push(true);
    let e = c.validate().unwrap_err().to_string();
    assert_contains(
        &e,
        &["configuration: use_mask_for_norm: invalid value [false, true]"],
    );
    let e = e.clone();
    assert!(!e.is_empty());
    let err = c.validate().unwrap_err().with_file("somewhere.json");
    assert_eq!(err.file(), "somewhere.json");
}
