//! Error chains as the cache clients (the executor's and `kiln-cache`)
//! report them.
//!
//! An HTTP client's error prints only its outermost layer ("error sending
//! request"); the reason a TLS handshake failed sits several sources down.
//! [`chain`] renders the whole chain once, and [`is_certificate_problem`]
//! tells a refused certificate (ours or the server's) from a server that
//! cannot be reached, so the two get different advice. [`cannot_link`]
//! classifies the one filesystem error both content stores act on.

use std::error::Error;

/// `e` and its sources, joined by ": ", each message once: many errors
/// already include their cause in their own message (`cannot read X:
/// <cause>`) and also return it as `source()`, so printing the chain as
/// `{:#}` would show that cause twice. This is also the binaries' one-line
/// error report ([`crate::error_report`]).
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(source) = next {
        let text = source.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = source.source();
    }
    out
}

/// Whether the chain says a TLS certificate was refused: the server's
/// (unknown issuer, wrong name, expired) or ours (the server asked for a
/// client certificate, or did not accept the one given).
pub fn is_certificate_problem(e: &(dyn Error + 'static)) -> bool {
    let text = chain(e).to_ascii_lowercase();
    ["certificate", "unknownca", "unknown ca", "unknownissuer"]
        .iter()
        .any(|w| text.contains(w))
}

/// Whether the chain says the peer closed or reset the connection before
/// answering. Over TLS 1.3 that is how a server requiring client
/// certificates refuses a client without one: it checks the client's
/// certificate after the client considers the handshake done, and the
/// client, already writing its request, often sees only the closed
/// connection, not the alert.
pub fn is_connection_closed(e: &(dyn Error + 'static)) -> bool {
    let text = chain(e).to_ascii_lowercase();
    [
        "connection closed",
        "channel closed",
        "connection reset",
        "unexpected eof",
        "broken pipe",
    ]
    .iter()
    .any(|w| text.contains(w))
}

/// True for hard-link errors that mean "not here", not "broken": a
/// different filesystem, or one that does not allow hard links (the
/// executor's store and the embedded cache share blobs by hard link and
/// copy only then).
pub fn cannot_link(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV) | Some(libc::EPERM) | Some(libc::EMLINK) | Some(libc::EOPNOTSUPP)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read {path}: {source}")]
    struct Inline {
        path: String,
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("writing x")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_report_prints_every_cause_once() {
        let inline = Inline {
            path: "/ctx/Dockerfile".into(),
            source: std::io::Error::other("stream did not contain valid UTF-8"),
        };
        assert_eq!(
            chain(&inline),
            "cannot read /ctx/Dockerfile: stream did not contain valid UTF-8"
        );
        let wrapped = Outer(std::io::Error::other("disk full"));
        assert_eq!(chain(&wrapped), "writing x: disk full");
    }

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<dyn Error + Send + Sync + 'static>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as &(dyn Error + 'static))
        }
    }

    #[test]
    fn chain_names_the_innermost_reason_once() {
        let inner = Layer("invalid peer certificate: UnknownIssuer", None);
        let io = std::io::Error::other(inner);
        let outer = Layer("error sending request", Some(Box::new(io)));
        assert_eq!(
            chain(&outer),
            "error sending request: invalid peer certificate: UnknownIssuer"
        );
        assert!(is_certificate_problem(&outer));
    }

    #[test]
    fn a_refused_connection_is_no_certificate_problem() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let outer = Layer("error sending request", Some(Box::new(io)));
        assert!(!is_certificate_problem(&outer));
        let alert = Layer("received fatal alert: CertificateRequired", None);
        assert!(is_certificate_problem(&alert));
        assert!(!is_connection_closed(&outer));
        let closed = Layer("client error (Canceled): connection closed", None);
        assert!(is_connection_closed(&closed) && !is_certificate_problem(&closed));
    }
}
