//! `cargo xtask download`: puts the four IDX files of MNIST or Fashion-MNIST under
//! `data/<dataset>/`, either copied from a local folder (`--from DIR`, or `DEBIASDD_MNIST_DIR`
//! for MNIST) or downloaded from public mirrors, and verifies them (SHA-256 of the decompressed
//! content, then a full structural load).
//!
//! Downloads go to a temporary file in the destination folder and are renamed into place only
//! once verified. Each mirror gets a few attempts with a short backoff for transient failures
//! (server errors, cut-off transfers); a mirror that cannot even be resolved or connected to is
//! skipped at once, so without network the command fails within seconds.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use debiasdd_cmnist::source::{SourceFile, find_file, read_verified};
use debiasdd_cmnist::{GreySource, SourceKind, Verification};
use tempfile::NamedTempFile;

/// Environment variable naming a local MNIST folder (used when `--from` is absent).
pub const MNIST_DIR_ENV: &str = "DEBIASDD_MNIST_DIR";

const MNIST_MIRRORS: &[&str] = &[
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
];
const FASHION_MNIST_MIRRORS: &[&str] = &[
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
];
/// Largest file accepted from a mirror (train images are ~10 MB gzipped, 47 MB raw).
const MAX_DOWNLOAD_BYTES: u64 = 100 * 1024 * 1024;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Arguments of `cargo xtask download`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Which dataset: mnist, fashion-mnist (the four IDX files) or cifar10 (the CIFAR-10
    /// binary archive).
    #[arg(long, default_value = "mnist")]
    pub dataset: Dataset,
    /// Copy the four files (`NAME.gz` or raw `NAME`) from this local folder instead of
    /// downloading. For MNIST, defaults to $DEBIASDD_MNIST_DIR when that is set.
    #[arg(long, value_name = "DIR", visible_alias = "mnist-dir")]
    pub from: Option<PathBuf>,
    /// Destination folder [default: data/<dataset> under the project root].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Accept files whose content checksum differs from the published dataset (warns per file).
    #[arg(long)]
    pub skip_checksum: bool,
}

/// What `cargo xtask download` fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataset {
    /// A grey IDX source: MNIST or Fashion-MNIST.
    Grey(SourceKind),
    /// The CIFAR-10 binary archive.
    Cifar10,
}

impl Default for Dataset {
    fn default() -> Self {
        Dataset::Grey(SourceKind::Mnist)
    }
}

impl Dataset {
    /// The grey source, if this is one.
    pub fn grey(self) -> Option<SourceKind> {
        match self {
            Dataset::Grey(kind) => Some(kind),
            Dataset::Cifar10 => None,
        }
    }
}

impl From<SourceKind> for Dataset {
    fn from(kind: SourceKind) -> Self {
        Dataset::Grey(kind)
    }
}

impl std::str::FromStr for Dataset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cifar10" => Ok(Dataset::Cifar10),
            other => other
                .parse::<SourceKind>()
                .map(Dataset::Grey)
                .map_err(|e| format!("{e}, or cifar10")),
        }
    }
}

/// How often to try one mirror, and the pause before the second attempt (doubled after).
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub attempts: u32,
    pub backoff: Duration,
}

impl Retry {
    pub const DEFAULT: Retry = Retry {
        attempts: 3,
        backoff: Duration::from_millis(500),
    };
}

/// Runs the task; `root` is the project root that the default destination hangs off. Returns
/// the verified source, loaded.
pub fn run(args: Args, root: &Path) -> Result<GreySource> {
    let Some(kind) = args.dataset.grey() else {
        bail!(
            "{:?} is not a grey IDX source; `cargo xtask download --dataset cifar10` fetches CIFAR-10",
            args.dataset
        );
    };
    let verification = if args.skip_checksum {
        Verification::Skip
    } else {
        Verification::Checksums
    };
    let dest = args
        .out
        .unwrap_or_else(|| root.join("data").join(kind.name()));
    let env_dir = match kind {
        SourceKind::Mnist => std::env::var_os(MNIST_DIR_ENV).filter(|v| !v.is_empty()),
        SourceKind::FashionMnist => None,
    };
    let from_env = args.from.is_none() && env_dir.is_some();
    let from = args.from.or(env_dir.map(PathBuf::from));
    match from {
        Some(dir) => {
            let via = if from_env {
                format!(" (${MNIST_DIR_ENV})")
            } else {
                String::new()
            };
            println!(
                "{kind}: copying from {}{via} into {}",
                dir.display(),
                dest.display()
            );
            copy_from(&dir, &dest, kind, verification)
                .with_context(|| format!("cannot copy {kind} from {}{via}", dir.display()))?;
        }
        None => {
            println!("{kind}: downloading into {}", dest.display());
            download_all(&dest, kind, mirrors(kind), verification, Retry::DEFAULT)?;
        }
    }
    let source = GreySource::load(&dest, kind, verification)
        .with_context(|| format!("final check of {} failed", dest.display()))?;
    println!(
        "{kind}: ok, {} train and {} test images of {}x{} in {} (content id {})",
        source.train_images.count,
        source.test_images.count,
        source.train_images.rows,
        source.train_images.cols,
        dest.display(),
        &source.content_id()[..16],
    );
    Ok(source)
}

/// The public mirrors of `kind`, in the order they are tried.
pub fn mirrors(kind: SourceKind) -> &'static [&'static str] {
    match kind {
        SourceKind::Mnist => MNIST_MIRRORS,
        SourceKind::FashionMnist => FASHION_MNIST_MIRRORS,
    }
}

/// The URL of `name.gz` on each mirror, in order.
pub fn file_urls(mirrors: &[&str], name: &str) -> Vec<String> {
    mirrors
        .iter()
        .map(|m| format!("{}/{name}.gz", m.trim_end_matches('/')))
        .collect()
}

/// Reads and checks one file; with [`Verification::Skip`] a differing checksum only warns.
/// Returns how the file passed: "verified", or "accepted" when its checksum differs.
fn check(
    path: &Path,
    kind: SourceKind,
    file: &SourceFile,
    verification: Verification,
) -> Result<&'static str> {
    let (_, actual) = read_verified(path, kind, file, verification)?;
    if actual != file.sha256 {
        eprintln!(
            "warning: {}: SHA-256 {actual} differs from the published {kind} checksum {}; \
             kept because of --skip-checksum",
            path.display(),
            file.sha256
        );
        return Ok("accepted");
    }
    Ok("verified")
}

/// True when `dest` already holds a good copy of `file`; a bad copy is reported and replaced.
fn already_present(
    dest: &Path,
    kind: SourceKind,
    file: &SourceFile,
    verification: Verification,
) -> bool {
    let Ok(path) = find_file(dest, kind, file.name) else {
        return false;
    };
    match check(&path, kind, file, verification) {
        Ok(status) => {
            println!("{}: already {status} ({})", file.name, path.display());
            true
        }
        Err(e) => {
            println!(
                "{}: existing copy fails verification, replacing it ({e:#})",
                file.name
            );
            false
        }
    }
}

/// Moves a verified temporary file into `dest` as `name.gz` (if it is gzip) or `name`, removing
/// the other variant so that a stale copy cannot shadow it.
fn store(tmp: NamedTempFile, dest: &Path, name: &str) -> Result<PathBuf> {
    let mut magic = [0u8; 2];
    let is_gzip = std::fs::File::open(tmp.path())
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == GZIP_MAGIC;
    let (target, other) = if is_gzip {
        (dest.join(format!("{name}.gz")), dest.join(name))
    } else {
        (dest.join(name), dest.join(format!("{name}.gz")))
    };
    if other.is_file() {
        std::fs::remove_file(&other)
            .with_context(|| format!("cannot remove stale {}", other.display()))?;
    }
    tmp.persist(&target).with_context(|| {
        format!(
            "cannot move the new file into place as {}",
            target.display()
        )
    })?;
    Ok(target)
}

pub fn create_dest(dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest)
        .with_context(|| format!("cannot create destination folder {}", dest.display()))
}

/// A temporary file in `dest` whose name shows what it will become.
pub fn temp_in(dest: &Path, name: &str) -> Result<NamedTempFile> {
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".part");
    // Data files, not secrets: the usual rw-r--r-- (less the umask) rather than tempfile's 0600.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    builder
        .tempfile_in(dest)
        .with_context(|| format!("cannot create a temporary file in {}", dest.display()))
}

/// Copies the four files of `kind` from the local folder `from` into `dest`, verifying each.
pub fn copy_from(
    from: &Path,
    dest: &Path,
    kind: SourceKind,
    verification: Verification,
) -> Result<()> {
    if !from.is_dir() {
        bail!(
            "--from / --mnist-dir folder {} does not exist or is not a folder; point it at a folder holding \
             the four {kind} IDX files (NAME.gz or NAME)",
            from.display()
        );
    }
    create_dest(dest)?;
    for file in kind.files() {
        if already_present(dest, kind, file, verification) {
            continue;
        }
        let src = find_file(from, kind, file.name)?;
        let status = check(&src, kind, file, verification)?;
        let mut tmp = temp_in(dest, file.name)?;
        // Copy the bytes only: `fs::copy` would also copy a read-only mode from the source.
        std::fs::File::open(&src)
            .and_then(|mut f| std::io::copy(&mut f, tmp.as_file_mut()))
            .with_context(|| {
                format!("cannot copy {} to {}", src.display(), tmp.path().display())
            })?;
        let target = store(tmp, dest, file.name)?;
        println!("{}: {status}, copied to {}", file.name, target.display());
    }
    Ok(())
}

/// Downloads the missing files of `kind` into `dest`, trying `mirrors` in order.
pub fn download_all(
    dest: &Path,
    kind: SourceKind,
    mirrors: &[&str],
    verification: Verification,
    retry: Retry,
) -> Result<()> {
    let agent = agent();
    create_dest(dest)?;
    for file in kind.files() {
        if already_present(dest, kind, file, verification) {
            continue;
        }
        let urls = file_urls(mirrors, file.name);
        let stored = fetch_verified(
            &agent,
            &urls,
            dest,
            file.name,
            MAX_DOWNLOAD_BYTES,
            retry,
            &|path| check(path, kind, file, verification),
        );
        match stored {
            Ok((tmp, status)) => {
                let target = store(tmp, dest, file.name)?;
                println!("{}: {status}, saved as {}", file.name, target.display());
            }
            Err(failures) => bail!("{}", no_mirror_message(kind, file.name, &failures)),
        }
    }
    Ok(())
}

fn no_mirror_message(kind: SourceKind, name: &str, failures: &[String]) -> String {
    let (env_hint, example) = match kind {
        SourceKind::Mnist => (
            format!(" or set {MNIST_DIR_ENV}=DIR"),
            ", e.g. a local copy such as ../shared/data/mnist",
        ),
        SourceKind::FashionMnist => (String::new(), ""),
    };
    format!(
        "could not download {name}.gz from any {kind} mirror:\n  {}\nWithout internet access, \
         pass `--mnist-dir DIR`{env_hint} with a folder holding the four {kind} files (NAME.gz or \
         NAME){example}",
        failures.join("\n  ")
    )
}

/// One download attempt into a temporary file. The error says whether a retry could help.
/// The first good copy of `name` from `urls`, tried in order: each URL gets `retry.attempts`
/// tries for transient failures; content that fails `check` moves on to the next URL. On
/// success, the temporary file (in `dest`) and `check`'s verdict; otherwise every failure.
pub fn fetch_verified(
    agent: &ureq::Agent,
    urls: &[String],
    dest: &Path,
    name: &str,
    limit: u64,
    retry: Retry,
    check: &dyn Fn(&Path) -> Result<&'static str>,
) -> Result<(NamedTempFile, &'static str), Vec<String>> {
    let mut failures = Vec::new();
    'mirrors: for url in urls {
        for attempt in 1..=retry.attempts.max(1) {
            if attempt > 1 {
                std::thread::sleep(retry.backoff.saturating_mul(1 << (attempt - 2).min(8)));
            }
            println!("{name}: fetching {url} (attempt {attempt})");
            match fetch(agent, url, dest, name, limit) {
                Ok(tmp) => match check(tmp.path()) {
                    Ok(status) => return Ok((tmp, status)),
                    Err(e) => {
                        println!("  bad content: {e:#}");
                        failures.push(format!("{url}: bad content: {e:#}"));
                        continue 'mirrors;
                    }
                },
                Err((e, retryable)) => {
                    println!("  failed: {e}");
                    if !retryable || attempt == retry.attempts.max(1) {
                        failures.push(format!("{url}: {e}"));
                        continue 'mirrors;
                    }
                }
            }
        }
    }
    Err(failures)
}

/// The HTTP agent of every download: short resolve and connect timeouts, so that a machine
/// without network fails within seconds.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_resolve(Some(Duration::from_secs(5)))
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_per_read(Some(Duration::from_secs(30)))
        .user_agent("debiasdd-xtask")
        .build()
        .into()
}

fn fetch(
    agent: &ureq::Agent,
    url: &str,
    dest: &Path,
    name: &str,
    limit: u64,
) -> Result<NamedTempFile, (String, bool)> {
    let retryable = |e: &ureq::Error| match e {
        ureq::Error::StatusCode(code) => *code == 429 || *code >= 500,
        ureq::Error::Timeout(t) => !matches!(t, ureq::Timeout::Resolve | ureq::Timeout::Connect),
        ureq::Error::Io(e) => !matches!(e.kind(), std::io::ErrorKind::ConnectionRefused),
        ureq::Error::Protocol(_) | ureq::Error::BodyStalled => true,
        _ => false,
    };
    let response = agent
        .get(url)
        .call()
        .map_err(|e| (e.to_string(), retryable(&e)))?;
    let mut tmp = temp_in(dest, name).map_err(|e| (format!("{e:#}"), false))?;
    let mut body = response
        .into_body()
        .into_with_config()
        .limit(limit)
        .reader();
    std::io::copy(&mut body, tmp.as_file_mut()).map_err(|e| {
        let e = ureq::Error::from(e);
        (format!("transfer cut off: {e}"), retryable(&e))
    })?;
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    #[test]
    fn urls_join_mirror_and_name_with_one_slash() {
        let urls = file_urls(
            &["https://a.example/mnist/", "http://b.example/x"],
            "t10k-labels-idx1-ubyte",
        );
        assert_eq!(
            urls,
            [
                "https://a.example/mnist/t10k-labels-idx1-ubyte.gz",
                "http://b.example/x/t10k-labels-idx1-ubyte.gz"
            ]
        );
        assert!(mirrors(SourceKind::Mnist).len() >= 2);
        assert!(mirrors(SourceKind::FashionMnist).len() >= 2);
    }

    #[test]
    fn copy_from_synthetic_source_with_and_without_checksums() -> Result<()> {
        let src = tempfile::tempdir()?;
        debiasdd_cmnist::source::write_synthetic_source(src.path(), 30, 10)?;
        let dest = tempfile::tempdir()?;
        let err = copy_from(
            src.path(),
            dest.path(),
            SourceKind::Mnist,
            Verification::Checksums,
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("train-images-idx3-ubyte"), "{msg}");
        assert!(msg.contains("--skip-checksum"), "{msg}");
        assert!(find_file(dest.path(), SourceKind::Mnist, "train-images-idx3-ubyte").is_err());

        copy_from(
            src.path(),
            dest.path(),
            SourceKind::Mnist,
            Verification::Skip,
        )?;
        let loaded = GreySource::load(dest.path(), SourceKind::Mnist, Verification::Skip)?;
        assert_eq!(
            (loaded.train_images.count, loaded.test_labels.len()),
            (30, 10)
        );
        // A second run finds everything present; no temporary files are left behind.
        copy_from(
            src.path(),
            dest.path(),
            SourceKind::Mnist,
            Verification::Skip,
        )?;
        let names: Vec<_> = std::fs::read_dir(dest.path())?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        assert_eq!(names.len(), 4, "{names:?}");
        assert!(names.iter().all(|n| !n.ends_with(".part")), "{names:?}");
        Ok(())
    }

    #[test]
    fn missing_from_folder_is_named() -> Result<()> {
        let dest = tempfile::tempdir()?;
        let missing = dest.path().join("no-such-folder");
        let err = copy_from(
            &missing,
            dest.path(),
            SourceKind::Mnist,
            Verification::Checksums,
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("no-such-folder"), "{msg}");
        assert!(msg.contains("--from"), "{msg}");
        Ok(())
    }

    #[test]
    fn unreachable_mirrors_fail_fast_and_suggest_a_local_folder() -> Result<()> {
        let dest = tempfile::tempdir()?;
        let retry = Retry {
            attempts: 3,
            backoff: Duration::from_millis(50),
        };
        let start = Instant::now();
        let err = download_all(
            dest.path(),
            SourceKind::Mnist,
            &["http://127.0.0.1:9/", "http://127.0.0.1:9/mirror2/"],
            Verification::Checksums,
            retry,
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "took {:?}",
            start.elapsed()
        );
        assert!(msg.contains("--mnist-dir"), "{msg}");
        assert!(msg.contains(MNIST_DIR_ENV), "{msg}");
        assert!(
            msg.contains("http://127.0.0.1:9/mirror2/train-images-idx3-ubyte.gz"),
            "{msg}"
        );
        assert_eq!(
            std::fs::read_dir(dest.path())?.count(),
            0,
            "nothing left behind"
        );
        Ok(())
    }

    /// A one-thread HTTP server on a free local port serving the files of `dir` (`/NAME` reads
    /// `dir/NAME`); the first `fail_first` requests get a 503. Returns its URL and a request count.
    fn serve(dir: PathBuf, fail_first: usize) -> Result<(String, Arc<AtomicUsize>)> {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}/", listener.local_addr()?);
        let count = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&count);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(&stream);
                let mut request = String::new();
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    request.push_str(&line);
                    line.clear();
                }
                let path = request
                    .split(' ')
                    .nth(1)
                    .unwrap_or("/")
                    .trim_start_matches('/');
                let n = seen.fetch_add(1, Ordering::SeqCst);
                let (status, body) = match std::fs::read(dir.join(path)) {
                    _ if n < fail_first => ("503 Service Unavailable", Vec::new()),
                    Ok(body) => ("200 OK", body),
                    Err(_) => ("404 Not Found", Vec::new()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream
                    .write_all(head.as_bytes())
                    .and_then(|()| stream.write_all(&body));
            }
        });
        Ok((url, count))
    }

    #[test]
    fn downloads_retry_verify_and_skip_present_files() -> Result<()> {
        use std::io::Write;
        // Mirror 1 lacks everything (404, no retry); mirror 2 serves two files gzipped and two
        // raw, and answers its first request with a 503 (retried).
        let served = tempfile::tempdir()?;
        debiasdd_cmnist::source::write_synthetic_source(served.path(), 20, 10)?;
        for name in ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"] {
            let raw = std::fs::read(served.path().join(name))?;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&raw)?;
            std::fs::write(served.path().join(format!("{name}.gz")), gz.finish()?)?;
        }
        for name in ["train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"] {
            // Served under the `.gz` name but not gzip, like a mirror that decompressed it.
            std::fs::rename(
                served.path().join(name),
                served.path().join(format!("{name}.gz")),
            )?;
        }
        let empty = tempfile::tempdir()?;
        let (url1, count1) = serve(empty.path().to_owned(), 0)?;
        let (url2, count2) = serve(served.path().to_owned(), 1)?;
        let dest = tempfile::tempdir()?;
        let retry = Retry {
            attempts: 3,
            backoff: Duration::from_millis(10),
        };
        let mirrors = [url1.as_str(), url2.as_str()];
        download_all(
            dest.path(),
            SourceKind::Mnist,
            &mirrors,
            Verification::Skip,
            retry,
        )?;
        assert_eq!(
            count1.load(Ordering::SeqCst),
            4,
            "one 404 per file, no retry"
        );
        assert_eq!(
            count2.load(Ordering::SeqCst),
            5,
            "one 503 retried, then 4 files"
        );
        let mut names: Vec<_> = std::fs::read_dir(dest.path())?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        assert_eq!(
            names,
            [
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte.gz",
                "train-images-idx3-ubyte.gz",
                "train-labels-idx1-ubyte"
            ]
        );
        let loaded = GreySource::load(dest.path(), SourceKind::Mnist, Verification::Skip)?;
        assert_eq!(loaded.train_images.count, 20);

        // Everything present: no further requests.
        download_all(
            dest.path(),
            SourceKind::Mnist,
            &mirrors,
            Verification::Skip,
            retry,
        )?;
        assert_eq!(
            count1.load(Ordering::SeqCst) + count2.load(Ordering::SeqCst),
            9
        );

        // With checksums the synthetic content is refused, the mirror is not retried, and the
        // error names the URL.
        let fresh = tempfile::tempdir()?;
        let err = download_all(
            fresh.path(),
            SourceKind::Mnist,
            &[url2.as_str()],
            Verification::Checksums,
            retry,
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&format!("{url2}train-images-idx3-ubyte.gz: bad content")),
            "{msg}"
        );
        assert_eq!(count2.load(Ordering::SeqCst), 6);
        assert_eq!(
            std::fs::read_dir(fresh.path())?.count(),
            0,
            "nothing left behind"
        );
        Ok(())
    }
}
