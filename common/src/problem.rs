//! Errors on the wire: RFC 9457 `application/problem+json` with a stable `code`.
//!
//! Every service has its own error enum and maps it once into a [`Problem`]. Errors raised
//! by the framework itself (unknown route, unparsable parameter, oversized body) are mapped by
//! [`problem_from_error`], installed on every service's route by [`crate::http`], so no error
//! of any kind leaves a service as anything but problem+json.

use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use poem_openapi::registry::{MetaMediaType, MetaResponse, MetaResponses, Registry};
use poem_openapi::types::Type;
use poem_openapi::{ApiResponse, Object};

/// The media type of every error body.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// An error answer: status, stable machine-readable code, human text and, where one input is
/// at fault, the field's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub status: StatusCode,
    pub code: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub field: Option<String>,
    /// Seconds a client should wait before retrying (429 and 503).
    pub retry_after_s: Option<u64>,
    /// Extension members of the body (RFC 9457 §3.2), e.g. the claims a limit counted.
    pub extensions: Vec<(&'static str, serde_json::Value)>,
}

/// The JSON body of a problem (RFC 9457).
#[derive(Debug, Clone, Object, serde::Deserialize)]
#[oai(rename = "Problem")]
pub struct ProblemBody {
    /// A URI reference naming the kind of problem; `/problems/{code}`.
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// A stable machine-readable code (`insufficient_funds`, `invalid_amount`, ...).
    pub code: String,
    /// The request field at fault, when there is one.
    #[oai(skip_serializing_if_is_none)]
    pub field: Option<String>,
}

impl Problem {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Problem {
            status,
            code,
            title,
            detail: detail.into(),
            field: None,
            retry_after_s: None,
            extensions: Vec::new(),
        }
    }

    /// Names the field at fault.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Adds an extension member to the body.
    pub fn with_extension(mut self, name: &'static str, value: serde_json::Value) -> Self {
        self.extensions.push((name, value));
        self
    }

    /// Adds a `Retry-After` header.
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }

    /// 400 for a request that cannot be understood.
    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::BAD_REQUEST, code, "Bad request", detail)
    }

    /// 404.
    pub fn not_found(code: &'static str, detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::NOT_FOUND, code, "Not found", detail)
    }

    /// 409: the request conflicts with the state or with an earlier request.
    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::CONFLICT, code, "Conflict", detail)
    }

    /// 422: understood, well-formed, but against a rule.
    pub fn unprocessable(code: &'static str, detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            code,
            "Unprocessable request",
            detail,
        )
    }

    /// 503 with a retry hint.
    pub fn unavailable(code: &'static str, detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code,
            "Service unavailable",
            detail,
        )
        .with_retry_after(1)
    }

    /// The answer to a request the database could not serve, by [`crate::db::classify`]:
    /// busy (every pooled connection taken, or the server refusing more work for now) is 503
    /// `overloaded`, unreachable is 503 `database_unavailable`, both with `Retry-After`
    /// ([`crate::db::RETRY_AFTER_S`]); anything else is a bug, 500 `internal`. The cause is
    /// logged here, once, naming `what` failed (`"the campaign database"`); it is never sent.
    pub fn from_db(err: &sea_orm::DbErr, what: &'static str) -> Self {
        use crate::db::{Failure, RETRY_AFTER_S, classify};
        match classify(err) {
            Failure::Busy => {
                tracing::warn!(error = %err, "{what} is busy; answering 503");
                Problem::unavailable(
                    "overloaded",
                    format!("{what} is busy; retry after {RETRY_AFTER_S} s"),
                )
                .with_retry_after(RETRY_AFTER_S)
            }
            Failure::Unavailable => {
                tracing::warn!(error = %err, "{what} is unavailable; answering 503");
                Problem::unavailable(
                    "database_unavailable",
                    format!("{what} cannot be reached; retry after {RETRY_AFTER_S} s"),
                )
                .with_retry_after(RETRY_AFTER_S)
            }
            Failure::Fault => {
                tracing::error!(error = %err, "{what} failed");
                Problem::internal()
            }
        }
    }

    /// 500. The detail stays generic: the cause is logged where it happened, never sent.
    pub fn internal() -> Self {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "the server failed to handle the request; it has been logged",
        )
    }

    /// The JSON body.
    pub fn body(&self) -> ProblemBody {
        ProblemBody {
            kind: format!("/problems/{}", self.code),
            title: self.title.to_owned(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            code: self.code.to_owned(),
            field: self.field.clone(),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.detail)
    }
}

impl std::error::Error for Problem {}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = serde_json::Map::new();
        body.insert("type".into(), format!("/problems/{}", self.code).into());
        body.insert("title".into(), self.title.into());
        body.insert("status".into(), self.status.as_u16().into());
        body.insert("detail".into(), self.detail.into());
        body.insert("code".into(), self.code.into());
        if let Some(field) = self.field {
            body.insert("field".into(), field.into());
        }
        for (name, value) in self.extensions {
            body.insert(name.into(), value);
        }
        let mut response = Response::builder()
            .status(self.status)
            .content_type(PROBLEM_CONTENT_TYPE)
            .body(serde_json::Value::Object(body).to_string());
        if let Some(seconds) = self.retry_after_s
            && let Ok(value) = seconds.to_string().parse()
        {
            response.headers_mut().insert("retry-after", value);
        }
        response
    }
}

impl poem::error::ResponseError for Problem {
    fn status(&self) -> StatusCode {
        self.status
    }

    fn as_response(&self) -> Response {
        self.clone().into_response()
    }
}

/// The statuses a problem may carry in the spec, with what each means.
const DOCUMENTED_STATUSES: &[(u16, &str)] = &[
    (
        400,
        "The request is malformed: bad JSON, unknown field, wrong type.",
    ),
    (401, "No valid bearer token."),
    (403, "The token's role or subject may not do this."),
    (404, "The resource does not exist."),
    (
        409,
        "Conflicts with the current state or an earlier request with the same key.",
    ),
    (410, "The resource is gone for good (sold out, ended)."),
    (413, "The request body is too large."),
    (
        422,
        "Well-formed but against a rule (insufficient funds, impossible split).",
    ),
    (429, "Rate limited; see Retry-After."),
    (500, "Internal error; logged, details withheld."),
    (
        503,
        "A dependency is unavailable or the service sheds load; see Retry-After.",
    ),
    (504, "A dependency did not answer in time."),
];

impl ApiResponse for Problem {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: DOCUMENTED_STATUSES
                .iter()
                .map(|(status, description)| MetaResponse {
                    description,
                    status: Some(*status),
                    status_range: None,
                    content: vec![MetaMediaType {
                        content_type: PROBLEM_CONTENT_TYPE,
                        schema: ProblemBody::schema_ref(),
                    }],
                    headers: vec![],
                })
                .collect(),
        }
    }

    fn register(registry: &mut Registry) {
        ProblemBody::register(registry);
    }
}

/// Maps any error that reached the edge of a service into problem+json.
pub fn problem_from_error(err: poem::Error) -> Problem {
    if let Some(problem) = err.downcast_ref::<Problem>() {
        return problem.clone();
    }
    if let Some(param) = err.downcast_ref::<poem_openapi::error::ParseParamError>() {
        return Problem::bad_request(
            "invalid_parameter",
            format!("parameter `{}`: {}", param.name, param.reason),
        )
        .with_field(param.name);
    }
    if let Some(param) = err.downcast_ref::<poem_openapi::error::ParsePathError>() {
        return Problem::bad_request(
            "invalid_parameter",
            format!("path parameter `{}`: {}", param.name, param.reason),
        )
        .with_field(param.name);
    }
    if let Some(payload) = err.downcast_ref::<poem_openapi::error::ParseRequestPayloadError>() {
        return Problem::bad_request("invalid_body", payload.reason.clone());
    }
    let status = err.status();
    match status {
        StatusCode::UNAUTHORIZED => Problem::new(
            status,
            "unauthorized",
            "Unauthorized",
            "a bearer token is required: `Authorization: Bearer <token>`",
        ),
        StatusCode::NOT_FOUND => Problem::not_found("not_found", "no such route"),
        StatusCode::METHOD_NOT_ALLOWED => Problem::new(
            status,
            "method_not_allowed",
            "Method not allowed",
            "this route does not accept that method",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => Problem::new(
            status,
            "payload_too_large",
            "Payload too large",
            "the request body exceeds the limit",
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => Problem::new(
            status,
            "unsupported_media_type",
            "Unsupported media type",
            err.to_string(),
        ),
        status if status.is_client_error() => {
            Problem::new(status, "bad_request", "Bad request", err.to_string())
        }
        _ => {
            tracing::error!(error = %err, "unhandled error at the edge");
            Problem::internal()
        }
    }
}
