//! OCI content digests.
//!
//! A [`Digest`] is always `sha256:` followed by 64 lowercase hex characters;
//! anything else is rejected at parse time, so a `Digest` value can be used
//! in a file path or URL without further checks.
//!
//! Hashing is streaming: [`Sha256Writer`] hashes (and counts) whatever passes
//! through it on the way to an inner writer, and [`VerifyingReader`] hashes
//! what it reads and turns end-of-file into an error when the content does
//! not match the digest it was promised.

use std::fmt;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const ALGORITHM: &str = "sha256";
const HEX_LEN: usize = 64;

/// Why a string is not a digest, or why content did not match one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest {0:?} has no algorithm prefix (expected sha256:<64 hex>)")]
    MissingAlgorithm(String),
    #[error("digest algorithm {0:?} is not supported (only sha256)")]
    UnsupportedAlgorithm(String),
    #[error("digest {0:?} must have exactly 64 lowercase hex characters after sha256:")]
    MalformedHex(String),
    #[error("content does not match its digest: expected {expected}, got {actual}")]
    Mismatch { expected: Digest, actual: Digest },
    #[error("content has {actual} bytes, but {expected} were expected")]
    SizeMismatch { expected: u64, actual: u64 },
}

/// A validated `sha256:<hex>` content digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// Digest of an in-memory byte slice (small things: configs, manifests).
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self::from_sha256(Sha256::digest(bytes).into())
    }

    /// Digest from raw sha256 output.
    pub fn from_sha256(raw: [u8; 32]) -> Self {
        Self {
            hex: hex::encode(raw),
        }
    }

    /// Accepts the bare 64-character hex form (as used in blob paths).
    pub fn from_hex(hex: &str) -> Result<Self, DigestError> {
        if hex.len() == HEX_LEN && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Self {
                hex: hex.to_owned(),
            })
        } else {
            Err(DigestError::MalformedHex(hex.to_owned()))
        }
    }

    pub fn algorithm(&self) -> &'static str {
        ALGORITHM
    }

    /// The 64 hex characters, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Path of this blob below a content-store root:
    /// `sha256/<first two hex>/<hex>`, spreading blobs over 256 directories.
    pub fn sharded_path(&self) -> std::path::PathBuf {
        std::path::Path::new(ALGORITHM)
            .join(&self.hex[..2])
            .join(&self.hex)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ALGORITHM}:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (algorithm, hex) = s
            .split_once(':')
            .ok_or_else(|| DigestError::MissingAlgorithm(s.to_owned()))?;
        if algorithm != ALGORITHM {
            return Err(DigestError::UnsupportedAlgorithm(algorithm.to_owned()));
        }
        Self::from_hex(hex).map_err(|_| DigestError::MalformedHex(s.to_owned()))
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> Self {
        d.to_string()
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Hashes and counts every byte written through it, passing them on to
/// `inner`. Works as a blocking [`Write`] and as a tokio [`AsyncWrite`].
/// Use `Sha256Writer::new(std::io::sink())` for a bare hasher.
#[derive(Debug)]
pub struct Sha256Writer<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W> Sha256Writer<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// Bytes accepted so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Digest of everything written so far, without consuming the writer.
    pub fn current_digest(&self) -> Digest {
        Digest::from_sha256(self.hasher.clone().finalize().into())
    }

    /// The inner writer, the digest and the byte count.
    pub fn finish(self) -> (W, Digest, u64) {
        let digest = Digest::from_sha256(self.hasher.finalize().into());
        (self.inner, digest, self.written)
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    fn record(&mut self, accepted: &[u8]) {
        self.hasher.update(accepted);
        self.written += accepted.len() as u64;
    }
}

impl<W: Write> Write for Sha256Writer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.record(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Sha256Writer<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.record(&buf[..n]);
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Reads from `inner` while hashing; at end-of-file compares against the
/// expected digest (and size, when known) and returns an
/// [`io::ErrorKind::InvalidData`] error wrapping [`DigestError`] on mismatch,
/// so a consumer that copies to EOF cannot mistake bad content for good.
#[derive(Debug)]
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
    expected: Digest,
    expected_size: Option<u64>,
    verified: bool,
}

impl<R> VerifyingReader<R> {
    pub fn new(inner: R, expected: Digest) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            read: 0,
            expected,
            expected_size: None,
            verified: false,
        }
    }

    /// Also require exactly `size` bytes; more bytes fail as soon as they arrive.
    pub fn with_size(mut self, size: u64) -> Self {
        self.expected_size = Some(size);
        self
    }

    /// True once EOF was reached and the content matched.
    pub fn is_verified(&self) -> bool {
        self.verified
    }

    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    fn account(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.hasher.update(chunk);
        self.read += chunk.len() as u64;
        match self.expected_size {
            Some(expected) if self.read > expected => {
                Err(invalid_data(DigestError::SizeMismatch {
                    expected,
                    actual: self.read,
                }))
            }
            _ => Ok(()),
        }
    }

    fn check_at_eof(&mut self) -> io::Result<()> {
        if self.verified {
            return Ok(());
        }
        if let Some(expected) = self.expected_size
            && expected != self.read
        {
            return Err(invalid_data(DigestError::SizeMismatch {
                expected,
                actual: self.read,
            }));
        }
        let actual = Digest::from_sha256(self.hasher.clone().finalize().into());
        if actual != self.expected {
            return Err(invalid_data(DigestError::Mismatch {
                expected: self.expected.clone(),
                actual,
            }));
        }
        self.verified = true;
        Ok(())
    }
}

fn invalid_data(err: DigestError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, err)
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            self.check_at_eof()?;
        } else {
            self.account(&buf[..n])?;
        }
        Ok(n)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for VerifyingReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let chunk = &buf.filled()[before..];
                if chunk.is_empty() {
                    Poll::Ready(this.check_at_eof())
                } else {
                    Poll::Ready(this.account(chunk))
                }
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_displays_the_canonical_form() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d, Digest::of_bytes(b""));
        assert_eq!(
            d.sharded_path(),
            std::path::Path::new("sha256/e3").join(&EMPTY[7..])
        );
    }

    #[test]
    fn rejects_malformed_digests() {
        for bad in [
            "",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha512:abcd",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0",
            "sha256:../../etc/passwd000000000000000000000000000000000000000000000000",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8550",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn serde_round_trips_and_rejects_garbage() {
        let d = Digest::of_bytes(b"x");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{d}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"sha256:nothex\"").is_err());
    }

    #[test]
    fn writer_hashes_what_passes_through() {
        let mut w = Sha256Writer::new(Vec::new());
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        let (inner, digest, n) = w.finish();
        assert_eq!(inner, b"hello world");
        assert_eq!(n, 11);
        assert_eq!(digest, Digest::of_bytes(b"hello world"));
    }

    #[tokio::test]
    async fn async_writer_hashes_what_passes_through() {
        use tokio::io::AsyncWriteExt;
        let mut w = Sha256Writer::new(Vec::new());
        AsyncWriteExt::write_all(&mut w, b"hello world")
            .await
            .unwrap();
        let (_, digest, n) = w.finish();
        assert_eq!((digest, n), (Digest::of_bytes(b"hello world"), 11));
    }

    #[test]
    fn verifying_reader_accepts_matching_content() {
        let mut r = VerifyingReader::new(&b"abc"[..], Digest::of_bytes(b"abc")).with_size(3);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert!(r.is_verified());
        assert_eq!(out, b"abc");
    }

    #[test]
    fn verifying_reader_fails_loudly_on_mismatch() {
        let mut r = VerifyingReader::new(&b"abd"[..], Digest::of_bytes(b"abc"));
        let err = io::copy(&mut r, &mut io::sink()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(!r.is_verified());
    }

    #[test]
    fn verifying_reader_fails_on_wrong_size() {
        let mut r = VerifyingReader::new(&b"abcd"[..], Digest::of_bytes(b"abcd")).with_size(3);
        assert!(io::copy(&mut r, &mut io::sink()).is_err());
        let mut r = VerifyingReader::new(&b"ab"[..], Digest::of_bytes(b"ab")).with_size(3);
        assert!(io::copy(&mut r, &mut io::sink()).is_err());
    }

    #[tokio::test]
    async fn async_verifying_reader_fails_on_mismatch() {
        use tokio::io::AsyncReadExt;
        let mut r = VerifyingReader::new(&b"abd"[..], Digest::of_bytes(b"abc"));
        let mut out = Vec::new();
        let err = AsyncReadExt::read_to_end(&mut r, &mut out)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut r = VerifyingReader::new(&b"abc"[..], Digest::of_bytes(b"abc"));
        AsyncReadExt::read_to_end(&mut r, &mut out).await.unwrap();
        assert!(r.is_verified());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in ".*") {
            let _ = s.parse::<Digest>();
        }
    }
}
