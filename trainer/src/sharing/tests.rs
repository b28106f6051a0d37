use super::*;
use std::io::Cursor;

const DS: &str = "Dataset990_Demo";

fn write(path: &Path, bytes: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

/// A results folder with trained 2d and 3d_fullres models (fold 0; 2d also fold 1), their
/// cross-validation results and an ensemble of both.
fn results_with_models(root: &Path) -> ResultsDir {
    let results = ResultsDir::new(root.join(DS));
    for cfg in ["2d", "3d_fullres"] {
        let m = results
            .path()
            .join(format!("nnUNetTrainer__nnUNetPlans__{cfg}"));
        write(&m.join("plans.json"), b"{\"plans\": 1}");
        write(&m.join("dataset.json"), b"{\"ds\": 1}");
        write(&m.join("dataset_fingerprint.json"), b"{}");
        for fold in ["0", "1"] {
            let f = m.join(format!("fold_{fold}"));
            write(&f.join("checkpoint_final.safetensors"), cfg.as_bytes());
            write(&f.join("checkpoint_best.safetensors"), b"best");
            write(&f.join("progress.png"), b"png");
            write(&f.join("debug.json"), b"{}");
            write(&f.join("validation/summary.json"), b"{}");
            write(&f.join("validation/case_0.nii.gz"), b"seg");
            write(&f.join("validation/case_0.npz"), b"probabilities");
        }
        write(&m.join("crossval_results_folds_0/summary.json"), b"{}");
        write(
            &m.join("crossval_results_folds_0/postprocessing.json"),
            b"{}",
        );
        write(&m.join("crossval_results_folds_0/case_0.nii.gz"), b"seg");
    }
    let ens = results.ensemble(&datasets::layout::ensemble_name(
        "nnUNetTrainer__nnUNetPlans__2d",
        "nnUNetTrainer__nnUNetPlans__3d_fullres",
        &["0".to_string()],
    ));
    write(&ens.join("summary.json"), b"{}");
    write(&results.inference_information(), b"{}");
    results
}

fn request(results: &ResultsDir, out: &Path, configurations: &[&str]) -> ExportRequest {
    ExportRequest {
        results: results.clone(),
        configurations: configurations.iter().map(|s| s.to_string()).collect(),
        trainer: "nnUNetTrainer".into(),
        plans: "nnUNetPlans".into(),
        folds: vec!["0".into()],
        checkpoints: vec!["checkpoint_final.pth".into()],
        strict: true,
        export_crossval_predictions: false,
        output: out.to_path_buf(),
    }
}

fn entries(zip: &Path) -> Vec<String> {
    let mut a = zip::ZipArchive::new(File::open(zip).unwrap()).unwrap();
    let mut names: Vec<String> = (0..a.len())
        .map(|i| a.by_index(i).unwrap().name().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn export_holds_nnunets_layout_and_only_matching_ensembles() {
    let dir = tempfile::tempdir().unwrap();
    let results = results_with_models(&dir.path().join("res"));
    let out = dir.path().join("model.zip");
    let s = export_model_to_zip(&request(&results, &out, &["2d", "3d_fullres"])).unwrap();
    assert_eq!(s.configurations, ["2d", "3d_fullres"]);
    let names = entries(&out);
    let m = format!("{DS}/nnUNetTrainer__nnUNetPlans__2d");
    for expected in [
        format!("{m}/plans.json"),
        format!("{m}/dataset.json"),
        format!("{m}/dataset_fingerprint.json"),
        format!("{m}/fold_0/checkpoint_final.safetensors"),
        format!("{m}/fold_0/progress.png"),
        format!("{m}/fold_0/validation/summary.json"),
        format!("{m}/crossval_results_folds_0/summary.json"),
        format!("{m}/crossval_results_folds_0/postprocessing.json"),
        format!("{DS}/ensembles/ensemble___nnUNetTrainer__nnUNetPlans__2d___nnUNetTrainer__nnUNetPlans__3d_fullres___0/summary.json"),
        format!("{DS}/inference_information.json"),
    ] {
        assert!(names.contains(&expected), "{expected} missing from {names:?}");
    }
    for absent in ["fold_1", "checkpoint_best", ".npz", "case_0.nii.gz"] {
        assert!(
            !names.iter().any(|n| n.contains(absent)),
            "{absent} in {names:?}"
        );
    }
    assert_eq!(s.files, names.len());

    // the ensemble needs both members; validation predictions only on request
    let mut only_2d = request(&results, &out, &["2d"]);
    only_2d.export_crossval_predictions = true;
    export_model_to_zip(&only_2d).unwrap();
    let names = entries(&out);
    assert!(!names.iter().any(|n| n.contains("ensembles")), "{names:?}");
    assert!(names.contains(&format!("{m}/fold_0/validation/case_0.nii.gz")));
    assert!(!names.iter().any(|n| n.ends_with(".npz")), "{names:?}");
}

#[test]
fn export_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let results = results_with_models(&dir.path().join("res"));
    let out = dir.path().join("model.zip");
    let e = export_model_to_zip(&request(&results, &out, &["2d", "3d_lowres"])).unwrap_err();
    assert!(
        e.to_string().contains("3d_lowres") && e.to_string().contains("--not_strict"),
        "{e}"
    );
    assert!(!out.exists(), "no zip after a failed export");
    let mut lenient = request(&results, &out, &["2d", "3d_lowres"]);
    lenient.strict = false;
    assert_eq!(
        export_model_to_zip(&lenient).unwrap().configurations,
        ["2d"]
    );

    let mut req = request(&results, &out, &["2d"]);
    req.folds = vec!["3".into()];
    let e = export_model_to_zip(&req).unwrap_err();
    assert!(e.to_string().contains("fold_3"), "{e}");
    let mut req = request(&results, &out, &["2d"]);
    req.checkpoints = vec!["checkpoint_latest".into()];
    let e = export_model_to_zip(&req).unwrap_err();
    assert!(e.to_string().contains("checkpoint_latest"), "{e}");
    // an nnU-Net fold (.pth only) exports its .pth
    let fold = results.path().join("nnUNetTrainer__nnUNetPlans__2d/fold_0");
    fs::remove_file(fold.join("checkpoint_final.safetensors")).unwrap();
    write(&fold.join("checkpoint_final.pth"), b"torch");
    export_model_to_zip(&request(&results, &out, &["2d"])).unwrap();
    assert!(entries(&out)
        .iter()
        .any(|n| n.ends_with("fold_0/checkpoint_final.pth")));
}

#[test]
fn install_round_trips_an_export() {
    let dir = tempfile::tempdir().unwrap();
    let results = results_with_models(&dir.path().join("res"));
    let out = dir.path().join("model.zip");
    export_model_to_zip(&request(&results, &out, &["2d", "3d_fullres"])).unwrap();
    let other = dir.path().join("other_results");
    let installed = install_model_from_zip(&out, &other).unwrap();
    assert_eq!(installed.files, entries(&out).len());
    assert_eq!(
        installed.model_folders,
        [
            other.join(DS).join("nnUNetTrainer__nnUNetPlans__2d"),
            other
                .join(DS)
                .join("nnUNetTrainer__nnUNetPlans__3d_fullres")
        ]
    );
    for name in entries(&out) {
        let a = fs::read(dir.path().join("res").join(&name)).unwrap();
        let b = fs::read(other.join(&name)).unwrap();
        assert_eq!(a, b, "{name}");
    }
    let left: Vec<_> = fs::read_dir(&other)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, [DS], "no staging folder left");
}

fn zip_with(entries: &[(&str, &[u8])], symlink: Option<&str>) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, bytes) in entries {
        w.start_file(*name, zip::write::SimpleFileOptions::default())
            .unwrap();
        w.write_all(bytes).unwrap();
    }
    if let Some(link) = symlink {
        w.add_symlink(
            link,
            "/etc/passwd",
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
    }
    w.finish().unwrap().into_inner()
}

#[test]
fn entries_outside_the_results_folder_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ok: (&str, &[u8]) = ("Dataset001_A/m__p__2d/plans.json", b"{}");
    for (bad, link) in [
        ("../evil.txt", None),
        ("/tmp/evil.txt", None),
        ("Dataset001_A/../../evil.txt", None),
        ("somewhere/evil.txt", None),
        ("Dataset001_A/x.txt", Some("Dataset001_A/link")),
    ] {
        let zip = dir.path().join("bad.zip");
        let mut files = vec![ok];
        if link.is_none() {
            files.push((bad, b"x"));
        }
        fs::write(&zip, zip_with(&files, link)).unwrap();
        let results = dir.path().join("results");
        let e = install_model_from_zip(&zip, &results).unwrap_err();
        assert!(matches!(e, SharingError::UnsafeEntry { .. }), "{bad}: {e}");
        assert!(
            !results.join("Dataset001_A").exists(),
            "{bad}: nothing installed"
        );
        assert!(!dir.path().join("evil.txt").exists());
    }
}

/// A real HTTP server on 127.0.0.1 serving `body` at `/model.zip` (404 elsewhere) for
/// `requests` requests.
fn serve(body: Vec<u8>, requests: usize) -> (String, std::thread::JoinHandle<()>) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let port = server.server_addr().to_ip().unwrap().port();
    let handle = std::thread::spawn(move || {
        for _ in 0..requests {
            let rq = server.recv().unwrap();
            let response = if rq.url() == "/model.zip" {
                tiny_http::Response::from_data(body.clone())
            } else {
                tiny_http::Response::from_data(b"not found".to_vec()).with_status_code(404)
            };
            rq.respond(response).unwrap();
        }
    });
    (format!("http://127.0.0.1:{port}"), handle)
}

#[test]
fn download_checks_the_checksum_then_installs() {
    let dir = tempfile::tempdir().unwrap();
    let results = results_with_models(&dir.path().join("res"));
    let zip = dir.path().join("model.zip");
    export_model_to_zip(&request(&results, &zip, &["2d"])).unwrap();
    let sha = sha256_file(&zip).unwrap();
    let (base, server) = serve(fs::read(&zip).unwrap(), 3);
    let target = dir.path().join("downloaded");
    let seen = std::cell::Cell::new(0u64);
    let progress = |done: u64, total: Option<u64>| {
        assert!(total.is_none_or(|t| done <= t));
        seen.set(done);
    };
    let url = format!("{base}/model.zip");
    let wrong = "0".repeat(64);
    let req = |sha| DownloadRequest {
        url: &url,
        sha256: sha,
        progress: &progress,
    };
    let e = download_and_install(&req(Some(&wrong)), &target).unwrap_err();
    assert!(matches!(e, SharingError::Checksum { .. }), "{e}");
    assert!(
        !target.join(DS).exists(),
        "nothing installed on a bad checksum"
    );
    let installed = download_and_install(&req(Some(&sha)), &target).unwrap();
    assert_eq!(installed.model_folders.len(), 1);
    assert_eq!(seen.get(), fs::metadata(&zip).unwrap().len());
    assert!(target
        .join(DS)
        .join("nnUNetTrainer__nnUNetPlans__2d/fold_0/checkpoint_final.safetensors")
        .is_file());
    let e = download_and_install(
        &DownloadRequest {
            url: &format!("{base}/missing.zip"),
            sha256: None,
            progress: &progress,
        },
        &target,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("missing.zip") && e.to_string().contains("404"),
        "{e}"
    );
    server.join().unwrap();
    let leftovers: Vec<_> = fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// nnU-Net's export of the 2D fixture model (a real `checkpoint_final.pth` written by nnU-Net)
/// imports straight from the zip, and the imported weights are the ones `import_nnunet_model`
/// gives for the folder itself.
#[test]
fn an_nnunet_zip_imports_directly() {
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/nnunet_checkpoint");
    let model = fixture.join("Dataset992_Fixture2D/nnUNetTrainer__nnUNetPlans__2d");
    assert!(model.is_dir(), "missing fixture {}", model.display());
    let dir = tempfile::tempdir().unwrap();
    let zip = dir.path().join("nnunet_model.zip");
    let files: Vec<PathBuf> = ["plans.json", "dataset.json", "fold_0/checkpoint_final.pth"]
        .iter()
        .map(|f| model.join(f))
        .collect();
    write_zip(&zip, &fixture, &files).unwrap();
    let results = dir.path().join("results");
    let imported = import_nnunet_zip(&zip, &results, "checkpoint_final.pth").unwrap();
    assert_eq!(imported.len(), 1);
    let installed = results.join("Dataset992_Fixture2D/nnUNetTrainer__nnUNetPlans__2d");
    assert_eq!(imported[0].model_folder, installed);
    assert_eq!(imported[0].fold, "0");
    let direct = crate::import::import_nnunet_model(&model, "0", "checkpoint_final.pth").unwrap();
    let from_zip =
        candle_core::safetensors::load(&imported[0].weights, &candle_core::Device::Cpu).unwrap();
    assert_eq!(from_zip.len(), direct.weights.len());
    for (name, t) in &direct.weights {
        let z = &from_zip[name];
        let d = (t - z).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{name}");
    }
}
