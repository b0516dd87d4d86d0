//! The gateway's errors: its own problems, and upstream problems passed through untouched (the
//! upstream already chose the status, the stable code and the field).

use bytes::Bytes;
use poem::http::{HeaderValue, StatusCode};
use poem::{IntoResponse, Response};
use poem_openapi::ApiResponse;
use poem_openapi::registry::{MetaResponses, Registry};
use redpacket_common::Problem;
use redpacket_common::problem::PROBLEM_CONTENT_TYPE;

/// An error answer of the public API.
#[derive(Debug, Clone)]
pub enum GatewayError {
    /// Decided here: auth, limits, breakers, bad input.
    Problem(Problem),
    /// An upstream's problem+json, relayed as it came.
    Upstream {
        status: StatusCode,
        body: Bytes,
        retry_after: Option<HeaderValue>,
    },
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::Problem(problem) => problem.status,
            GatewayError::Upstream { status, .. } => *status,
        }
    }
}

impl From<Problem> for GatewayError {
    fn from(problem: Problem) -> Self {
        GatewayError::Problem(problem)
    }
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GatewayError::Problem(problem) => problem.fmt(f),
            GatewayError::Upstream { status, body, .. } => {
                write!(f, "{} {}", status.as_u16(), String::from_utf8_lossy(body))
            }
        }
    }
}

impl std::error::Error for GatewayError {}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        match self {
            GatewayError::Problem(problem) => problem.into_response(),
            GatewayError::Upstream {
                status,
                body,
                retry_after,
            } => {
                let mut response = Response::builder()
                    .status(status)
                    .content_type(PROBLEM_CONTENT_TYPE)
                    .body(body);
                if let Some(value) = retry_after {
                    response.headers_mut().insert("retry-after", value);
                }
                response
            }
        }
    }
}

/// Carried as a ready response: the service edge passes responses through as they are (an
/// upstream's problem keeps its own code), where it maps bare framework errors itself.
impl From<GatewayError> for poem::Error {
    fn from(err: GatewayError) -> Self {
        poem::Error::from_response(err.into_response())
    }
}

impl ApiResponse for GatewayError {
    fn meta() -> MetaResponses {
        Problem::meta()
    }

    fn register(registry: &mut Registry) {
        Problem::register(registry);
    }
}

/// The role of the token does not allow the operation.
pub fn forbidden_role(needed: &str) -> GatewayError {
    Problem::new(
        StatusCode::FORBIDDEN,
        "forbidden_role",
        "Forbidden",
        format!("this operation needs a token with the role {needed}"),
    )
    .into()
}

/// Too many requests under the named limit.
pub fn rate_limited(limit: &'static str, wait: std::time::Duration) -> GatewayError {
    let seconds = wait.as_millis().div_ceil(1000).max(1);
    Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "Too many requests",
        format!("the {limit} rate limit is exhausted; retry after {seconds} s"),
    )
    .with_extension("limit", serde_json::Value::from(limit))
    .with_retry_after(u64::try_from(seconds).unwrap_or(u64::MAX))
    .into()
}
