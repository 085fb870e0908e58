//! `cargo xtask download --dataset cifar10`: puts the CIFAR-10 binary archive
//! (`cifar-10-binary.tar.gz`) under `data/cifar10/`, copied from a local file or folder
//! (`--from`) or downloaded from the dataset's mirrors with retries, and verifies it: the MD5
//! the dataset's page publishes, then a full read of every batch. CIFAR-10 cannot be fetched on
//! machines without internet; the tests serve tiny archives from a local HTTP server.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use debiasdd_cmnist::CifarArchive;
use debiasdd_cmnist::cifar::{CIFAR10_ARCHIVE_BYTES, CIFAR10_ARCHIVE_MD5};
use md5::{Digest, Md5};

use crate::download::{self, Args, Retry};

/// The archive's file name.
pub const ARCHIVE: &str = "cifar-10-binary.tar.gz";
/// Where the archive is published, tried in order.
pub const MIRRORS: &[&str] = &[
    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    "https://cave.cs.toronto.edu/kriz/cifar-10-binary.tar.gz",
];
/// Largest download accepted (the archive is 162 MiB).
const MAX_BYTES: u64 = 200 * 1024 * 1024;

/// MD5 of a file, lowercase hex.
fn md5_of(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Checks an archive: its MD5 against `expected_md5` (a mismatch only warns with
/// `skip_checksum`), then every batch by reading it. Returns "verified" or "accepted".
pub fn check(path: &Path, expected_md5: &str, skip_checksum: bool) -> Result<&'static str> {
    let md5 = md5_of(path)?;
    let status = if md5 == expected_md5 {
        "verified"
    } else if skip_checksum {
        eprintln!(
            "warning: {}: MD5 {md5} differs from the published CIFAR-10 archive's {expected_md5}; kept because of --skip-checksum",
            path.display()
        );
        "accepted"
    } else {
        bail!(
            "{}: MD5 {md5}, but the published CIFAR-10 binary archive has {expected_md5} ({CIFAR10_ARCHIVE_BYTES} bytes); the download is damaged or another file (pass --skip-checksum to use it anyway)",
            path.display()
        );
    };
    CifarArchive::load(path).with_context(|| format!("{} does not read", path.display()))?;
    Ok(status)
}

/// Runs the task; returns the path of the verified archive.
pub fn run(args: Args, root: &Path) -> Result<PathBuf> {
    run_with(args, root, MIRRORS, CIFAR10_ARCHIVE_MD5, Retry::DEFAULT)
}

/// [`run`] with the mirrors and checksum given (tests serve their own).
pub fn run_with(
    args: Args,
    root: &Path,
    mirrors: &[&str],
    md5: &str,
    retry: Retry,
) -> Result<PathBuf> {
    let dest = args.out.unwrap_or_else(|| root.join("data/cifar10"));
    let target = dest.join(ARCHIVE);
    if target.is_file() {
        match check(&target, md5, args.skip_checksum) {
            Ok(status) => {
                println!("cifar10: already {status} ({})", target.display());
                return Ok(target);
            }
            Err(e) => println!("cifar10: existing copy fails verification, replacing it ({e:#})"),
        }
    }
    download::create_dest(&dest)?;
    let tmp = match args.from {
        Some(from) => {
            let src = if from.is_dir() {
                from.join(ARCHIVE)
            } else {
                from
            };
            if !src.is_file() {
                bail!(
                    "--from {}: no {ARCHIVE} there; point it at the CIFAR-10 binary archive or the folder holding it",
                    src.display()
                );
            }
            let status = check(&src, md5, args.skip_checksum)?;
            let mut tmp = download::temp_in(&dest, ARCHIVE)?;
            std::fs::File::open(&src)
                .and_then(|mut f| std::io::copy(&mut f, tmp.as_file_mut()))
                .with_context(|| format!("cannot copy {}", src.display()))?;
            println!("cifar10: {status}, copied from {}", src.display());
            tmp
        }
        None => {
            let urls: Vec<String> = mirrors.iter().map(|m| m.to_string()).collect();
            let check = |path: &Path| check(path, md5, args.skip_checksum);
            match download::fetch_verified(
                &download::agent(),
                &urls,
                &dest,
                ARCHIVE,
                MAX_BYTES,
                retry,
                &check,
            ) {
                Ok((tmp, status)) => {
                    println!("cifar10: {status}");
                    tmp
                }
                Err(failures) => bail!(
                    "could not download {ARCHIVE} from any mirror:\n  {}\nWithout internet access, fetch it elsewhere and pass `--from FILE`",
                    failures.join("\n  ")
                ),
            }
        }
    };
    tmp.persist(&target)
        .with_context(|| format!("cannot move the archive into place as {}", target.display()))?;
    println!("cifar10: saved as {}", target.display());
    Ok(target)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpListener;

    use super::*;

    /// Serves `body` for every request, `failures` 500s first.
    fn serve(body: Vec<u8>, failures: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://{}/cifar-10-binary.tar.gz",
            listener.local_addr().unwrap()
        );
        std::thread::spawn(move || {
            for (i, stream) in listener.incoming().enumerate() {
                let mut stream = stream.unwrap();
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                let (status, payload): (&str, &[u8]) = if i < failures {
                    ("500 Internal Server Error", b"")
                } else {
                    ("200 OK", &body)
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    payload.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(payload);
            }
        });
        url
    }

    #[test]
    fn downloads_verifies_retries_and_refuses_bad_content() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let archive = dir.path().join("tiny.tar.gz");
        debiasdd_cmnist::cifar::write_synthetic_archive(&archive, 3, 2)?;
        let md5 = md5_of(&archive)?;
        let bytes = std::fs::read(&archive)?;
        let url = serve(bytes.clone(), 1);
        let retry = Retry {
            attempts: 2,
            backoff: std::time::Duration::from_millis(1),
        };
        let args = |out: &Path| Args {
            out: Some(out.to_owned()),
            ..Args::default()
        };
        let out = dir.path().join("a");
        let path = run_with(args(&out), dir.path(), &[url.as_str()], &md5, retry)?;
        assert_eq!(std::fs::read(&path)?, bytes);
        // Present and good: not fetched again (the mirror list is empty).
        assert_eq!(run_with(args(&out), dir.path(), &[], &md5, retry)?, path);

        // A server with other content: refused by checksum, nothing stored.
        let bad = serve(bytes[..bytes.len() - 1].to_vec(), 0);
        let out = dir.path().join("b");
        let err = run_with(args(&out), dir.path(), &[bad.as_str()], &md5, retry).unwrap_err();
        assert!(format!("{err:#}").contains("MD5"), "{err:#}");
        assert!(!out.join(ARCHIVE).exists());

        // From a local folder.
        let local = Args {
            from: Some(dir.path().to_owned()),
            ..args(&dir.path().join("c"))
        };
        std::fs::copy(&archive, dir.path().join(ARCHIVE))?;
        assert!(run_with(local, dir.path(), &[], &md5, retry)?.is_file());
        Ok(())
    }
}
