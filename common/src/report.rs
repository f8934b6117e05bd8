//! One-line error reports for the binaries.

/// One line for an error and its causes, each cause printed once.
///
/// Many errors already include their cause in their own message (`cannot
/// read X: <cause>`) and also return it as `source()`; printing the chain
/// as `{:#}` does then shows that cause twice. A cause whose text is
/// already part of what was printed is left out.
pub fn error_report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
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
            error_report(&inline),
            "cannot read /ctx/Dockerfile: stream did not contain valid UTF-8"
        );
        let wrapped = Outer(std::io::Error::other("disk full"));
        assert_eq!(error_report(&wrapped), "writing x: disk full");
    }
}
