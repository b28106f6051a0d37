//! End to end: a fold of the 2D demo trained by nnseg, exported with `export_model_to_zip`,
//! downloaded from a real HTTP server on 127.0.0.1 into other roots with
//! `download_pretrained_model_by_url` (and installed from the file with
//! `install_pretrained_model_from_zip`), predicts there exactly as it does where it was trained.

use std::fs;
use std::path::Path;

mod common;
use common::{pngs, predict_tiny_2d, train_tiny_2d, Env};

/// Two training images of the 2D demo copied into `dir` (as a test-images folder).
fn two_images(env: &Env, dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    let images = env.raw.join("Dataset991_Demo2D/imagesTr");
    let mut names: Vec<_> = fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for n in names.iter().take(2) {
        fs::copy(images.join(n), dir.join(n)).unwrap();
    }
}

/// Serves `body` at `/model.zip` on 127.0.0.1 for one request.
fn serve_once(body: Vec<u8>) -> (String, std::thread::JoinHandle<()>) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let port = server.server_addr().to_ip().unwrap().port();
    let handle = std::thread::spawn(move || {
        let rq = server.recv().unwrap();
        assert_eq!(rq.url(), "/model.zip");
        rq.respond(tiny_http::Response::from_data(body)).unwrap();
    });
    (format!("http://127.0.0.1:{port}/model.zip"), handle)
}

#[test]
fn exported_model_predicts_the_same_after_download_and_install() {
    let env = Env::new();
    train_tiny_2d(&env);
    let work = tempfile::tempdir().unwrap();
    let images = work.path().join("images");
    two_images(&env, &images);
    let reference = work.path().join("pred_here");
    predict_tiny_2d(&env, &images, &reference, &[]);

    let zip = work.path().join("model.zip");
    env.ok(&[
        "export_model_to_zip",
        "-d",
        "991",
        "-o",
        zip.to_str().unwrap(),
        "-c",
        "2d",
        "-tr",
        "nnUNetTrainer_1epoch",
        "-f",
        "0",
    ]);
    // a configuration that was not trained: an error unless --not_strict
    let e = env.fails(&[
        "export_model_to_zip",
        "-d",
        "991",
        "-o",
        zip.to_str().unwrap(),
        "-c",
        "2d",
        "3d_fullres",
        "-tr",
        "nnUNetTrainer_1epoch",
        "-f",
        "0",
    ]);
    assert!(
        e.contains("3d_fullres") && e.contains("--not_strict"),
        "{e}"
    );

    // other roots: only the downloaded model is there
    let there = Env::new();
    let (url, server) = serve_once(fs::read(&zip).unwrap());
    there.ok(&["download_pretrained_model_by_url", &url]);
    server.join().unwrap();
    let downloaded = work.path().join("pred_there");
    predict_tiny_2d(&there, &images, &downloaded, &[]);
    let a = pngs(&reference);
    assert_eq!(a.len(), 2);
    assert_eq!(a, pngs(&downloaded), "same model, same segmentations");

    // and from the file
    let third = Env::new();
    third.ok(&["install_pretrained_model_from_zip", zip.to_str().unwrap()]);
    let installed = work.path().join("pred_third");
    predict_tiny_2d(&third, &images, &installed, &[]);
    assert_eq!(a, pngs(&installed));
}
