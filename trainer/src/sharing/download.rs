//! `download_pretrained_model_by_url`: HTTP(S) download of a model zip, optional checksum,
//! then install.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;

use super::{install_model_from_zip, io_err, sha256_file, Installed, SharingError};

/// What to download.
pub struct DownloadRequest<'a> {
    pub url: &'a str,
    /// Expected SHA-256 (hex) of the zip; a mismatch deletes the download and installs nothing.
    pub sha256: Option<&'a str>,
    /// Called with (bytes so far, total when the server says) while downloading.
    pub progress: &'a dyn Fn(u64, Option<u64>),
}

/// Downloads `req.url` into a hidden file in `results_root`, checks the checksum if given,
/// installs it ([`install_model_from_zip`]) and deletes the download.
pub fn download_and_install(
    req: &DownloadRequest,
    results_root: &Path,
) -> Result<Installed, SharingError> {
    fs::create_dir_all(results_root).map_err(io_err(results_root))?;
    let tmp = results_root.join(format!(".nnseg_download.{}.zip", std::process::id()));
    let result = fetch(req, &tmp).and_then(|()| {
        if let Some(expected) = req.sha256 {
            let found = sha256_file(&tmp)?;
            if !found.eq_ignore_ascii_case(expected.trim()) {
                return Err(SharingError::Checksum {
                    url: req.url.to_string(),
                    expected: expected.trim().to_ascii_lowercase(),
                    found,
                });
            }
        }
        install_model_from_zip(&tmp, results_root)
    });
    let _ = fs::remove_file(&tmp);
    result
}

fn fetch(req: &DownloadRequest, to: &Path) -> Result<(), SharingError> {
    let err = |message: String| SharingError::Download {
        url: req.url.to_string(),
        message,
    };
    let mut response = ureq::get(req.url).call().map_err(|e| err(e.to_string()))?;
    let total = response.body().content_length();
    let mut reader = response.body_mut().as_reader();
    let mut out = io::BufWriter::new(File::create(to).map_err(io_err(to))?);
    let mut buf = vec![0u8; 1 << 16];
    let mut done = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| err(format!("download interrupted after {done} bytes: {e}")))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(io_err(to))?;
        done += n as u64;
        (req.progress)(done, total);
    }
    if let Some(total) = total.filter(|&t| t != done) {
        return Err(err(format!("received {done} of {total} bytes")));
    }
    out.flush().map_err(io_err(to))?;
    Ok(())
}
