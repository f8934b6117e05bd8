//! Extra trusted CA certificates from `SSL_CERT_FILE` and `SSL_CERT_DIR`.
//!
//! kiln's HTTPS clients trust the bundled Mozilla roots; images and CI jobs
//! add private CAs the way Go programs (Kaniko among them) expect: a PEM
//! bundle named by `SSL_CERT_FILE` (GitLab's Kaniko recipe appends the
//! registry's CA to `/kaniko/ssl/certs/ca-certificates.crt`), and every PEM
//! file in the directories of `SSL_CERT_DIR` (colon-separated). As Go, a
//! file in such a directory that holds no certificate is skipped; a named
//! `SSL_CERT_FILE` that cannot be read or holds none is an error naming it.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{variable}={}: {message}", path.display())]
pub struct TlsRootsError {
    pub variable: &'static str,
    pub path: PathBuf,
    pub message: String,
}

/// The CA certificates the environment adds, and the files they came from
/// (for messages about untrusted certificates).
#[derive(Debug, Default)]
pub struct EnvRoots {
    pub certificates: Vec<reqwest::Certificate>,
    pub sources: Vec<PathBuf>,
}

/// The certificates `SSL_CERT_FILE` and `SSL_CERT_DIR` add.
pub fn from_env() -> Result<EnvRoots, TlsRootsError> {
    roots(
        std::env::var_os("SSL_CERT_FILE").map(PathBuf::from),
        std::env::var_os("SSL_CERT_DIR").map(|d| std::env::split_paths(&d).collect()),
    )
}

fn roots(file: Option<PathBuf>, dirs: Option<Vec<PathBuf>>) -> Result<EnvRoots, TlsRootsError> {
    let mut out = EnvRoots::default();
    if let Some(path) = file.filter(|p| !p.as_os_str().is_empty()) {
        let error = |message: String| TlsRootsError {
            variable: "SSL_CERT_FILE",
            path: path.clone(),
            message,
        };
        let certs = read_bundle(&path).map_err(&error)?;
        if certs.is_empty() {
            return Err(error("no PEM certificate in the file".into()));
        }
        out.certificates.extend(certs);
        out.sources.push(path);
    }
    for dir in dirs.unwrap_or_default() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for path in files.into_iter().filter(|p| p.is_file()) {
            let certs = read_bundle(&path).unwrap_or_default();
            if !certs.is_empty() {
                out.certificates.extend(certs);
                out.sources.push(path);
            }
        }
    }
    Ok(out)
}

fn read_bundle(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Ok(Vec::new());
    }
    reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("not a PEM bundle: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_ca(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        let status = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=kiln test CA"])
            .arg("-keyout")
            .arg(dir.join(format!("{name}.key")))
            .arg("-out")
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(status.success());
        path
    }

    #[test]
    fn cert_file_and_every_certificate_file_of_cert_dirs_are_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle.crt");
        let a = std::fs::read(test_ca(dir.path(), "a.pem")).unwrap();
        let b = std::fs::read(test_ca(dir.path(), "b.pem")).unwrap();
        std::fs::write(&bundle, [a.clone(), b].concat()).unwrap();
        let certs = dir.path().join("certs");
        std::fs::create_dir(&certs).unwrap();
        std::fs::write(certs.join("one.crt"), &a).unwrap();
        std::fs::write(certs.join("README"), "not a certificate").unwrap();

        let from_file = roots(Some(bundle.clone()), None).unwrap();
        assert_eq!(from_file.certificates.len(), 2);
        assert_eq!(from_file.sources, [bundle]);
        let from_dir = roots(None, Some(vec![certs.clone()])).unwrap();
        assert_eq!(from_dir.certificates.len(), 1);
        assert_eq!(from_dir.sources, [certs.join("one.crt")]);
        let missing_dir = dir.path().join("nonexistent");
        let both = roots(None, Some(vec![missing_dir, certs])).unwrap();
        assert_eq!(both.certificates.len(), 1);
        assert!(roots(None, None).unwrap().certificates.is_empty());
    }

    #[test]
    fn a_named_cert_file_that_is_missing_or_holds_no_certificate_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.crt");
        let err = roots(Some(missing.clone()), None).unwrap_err().to_string();
        assert!(
            err.contains("SSL_CERT_FILE") && err.contains("missing.crt"),
            "{err}"
        );
        let empty = dir.path().join("empty.crt");
        std::fs::write(&empty, "").unwrap();
        let err = roots(Some(empty), None).unwrap_err().to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
    }
}
