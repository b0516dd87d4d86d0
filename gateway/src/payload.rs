//! An upstream's JSON answer relayed byte for byte, documented in the spec with the schema of
//! the type it holds. Parsing and re-serializing every grab's answer would cost CPU on the hot
//! path and could only lose fields.

use std::marker::PhantomData;

use bytes::Bytes;
use poem::{IntoResponse, Response};
use poem_openapi::payload::Payload;
use poem_openapi::registry::{MetaMediaType, MetaResponse, MetaResponses, MetaSchemaRef, Registry};
use poem_openapi::types::Type;

const JSON: &str = "application/json; charset=utf-8";

/// JSON bytes shaped like `T`.
pub struct Raw<T> {
    body: Bytes,
    shape: PhantomData<fn() -> T>,
}

impl<T> Raw<T> {
    pub fn new(body: Bytes) -> Self {
        Raw {
            body,
            shape: PhantomData,
        }
    }

    /// The JSON bytes.
    pub fn into_body(self) -> Bytes {
        self.body
    }

    /// Serializes a value of the documented shape.
    pub fn of<S: serde::Serialize>(value: &S) -> Self {
        Raw::new(Bytes::from(
            serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec()),
        ))
    }
}

impl<T> std::fmt::Debug for Raw<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Raw")
            .field("len", &self.body.len())
            .finish()
    }
}

impl<T: Type> Payload for Raw<T> {
    const CONTENT_TYPE: &'static str = JSON;

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: Send> IntoResponse for Raw<T> {
    fn into_response(self) -> Response {
        Response::builder().content_type(JSON).body(self.body)
    }
}

impl<T: Type> poem_openapi::ApiResponse for Raw<T> {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: vec![MetaResponse {
                description: "",
                status: Some(200),
                status_range: None,
                content: vec![MetaMediaType {
                    content_type: JSON,
                    schema: T::schema_ref(),
                }],
                headers: vec![],
            }],
        }
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}
