//! Error answers: [`ApiError`], `{"error":{"code","message"}}`, and the
//! one place where a storage error's class becomes a status and a code.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_common::ErrorBody;
use tracing::{error, warn};

use crate::auth::AuthError;

use super::*;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub(crate) fn internal(message: impl std::fmt::Display) -> Self {
        error!(error = %message, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            message.to_string(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, Json(ErrorBody::new(self.code, self.message))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The one mapping of storage failures to HTTP: every backend error says
/// its [`ErrorClass`], and the class alone decides the status and code.
impl<E: Classify + std::fmt::Display> From<E> for ApiError {
    fn from(e: E) -> Self {
        let message = e.to_string();
        let (status, code) = match e.class() {
            ErrorClass::Invalid => (StatusCode::BAD_REQUEST, "bad_request"),
            ErrorClass::DigestMismatch => (StatusCode::BAD_REQUEST, "digest_mismatch"),
            ErrorClass::MissingBlob => (StatusCode::UNPROCESSABLE_ENTITY, "missing_blob"),
            ErrorClass::SizeMismatch => (StatusCode::UNPROCESSABLE_ENTITY, "size_mismatch"),
            ErrorClass::Conflict => (StatusCode::CONFLICT, "conflict"),
            ErrorClass::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ErrorClass::Full => {
                warn!(error = %message, "the cache's storage is full");
                (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
            }
            ErrorClass::Unavailable => {
                warn!(error = %message, "the cache's storage does not answer");
                (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable")
            }
            ErrorClass::Internal => return Self::internal(message),
        };
        Self::new(status, code, message)
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let message = e.to_string();
        match e {
            AuthError::Missing | AuthError::BadToken => {
                Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
            }
            AuthError::Forbidden(_) => Self::new(StatusCode::FORBIDDEN, "forbidden", message),
            AuthError::Read { .. } | AuthError::Invalid { .. } => Self::internal(message),
        }
    }
}
