//! Reading what a registry answered: status errors with the start of the
//! body, small documents read up to a cap, and the one mapping of a body
//! that broke off mid-way.

use super::*;

pub(super) fn status_error(
    method: &'static str,
    url: &str,
    status: StatusCode,
    body: String,
) -> RegistryError {
    let mut body = body;
    body.truncate(500);
    RegistryError::Status {
        method,
        url: url.to_string(),
        status: status.as_u16(),
        body: body.trim().to_string(),
    }
}

pub(super) async fn fail(method: &'static str, url: &str, resp: Response) -> RegistryError {
    let status = resp.status();
    let body = error_body(resp).await;
    status_error(method, url, status, body)
}

/// The start of an error response's body: read no further than
/// [`MAX_ERROR_BODY`], whatever the registry keeps sending.
pub(super) async fn error_body(resp: Response) -> String {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() >= MAX_ERROR_BODY {
            body.truncate(MAX_ERROR_BODY);
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

pub(super) fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "REQUEST",
    }
}

/// Reads a small response body (a JSON document), refusing more than `cap`
/// bytes.
pub(super) async fn read_limited(
    resp: Response,
    url: &str,
    cap: u64,
) -> Result<Vec<u8>, RegistryError> {
    let too_big = || RegistryError::Manifest {
        reference: url.to_string(),
        reason: format!("document larger than {cap} bytes"),
    };
    if resp.content_length().is_some_and(|n| n > cap) {
        return Err(too_big());
    }
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|source| body_error("GET", url, source))?;
        if (out.len() + chunk.len()) as u64 > cap {
            return Err(too_big());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// A response body that broke off after the status line: the request is
/// named, with the whole error chain. Unlike [`RegistryClient::transport_error`]
/// there is nothing to explain about TLS, DNS or refused connections: the
/// registry did answer.
pub(super) fn body_error(method: &'static str, url: &str, source: reqwest::Error) -> RegistryError {
    RegistryError::Http {
        method,
        url: url.to_string(),
        detail: kiln_common::errors::chain(&source),
        source,
    }
}
