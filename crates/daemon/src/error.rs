//! The daemon's API error: a libvirt-like class plus a message that names the object and the fix.

use rvirt_api::rest::ErrorCode;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }

    pub fn no_domain(key: &str) -> ApiError {
        ApiError::new(
            ErrorCode::NoDomain,
            format!("Domain not found: no domain with matching name '{key}'"),
        )
    }

    pub fn invalid_op(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::OperationInvalid, message)
    }

    pub fn not_running() -> ApiError {
        ApiError::invalid_op("Requested operation is not valid: domain is not running")
    }

    pub fn invalid_arg(message: impl Into<String>) -> ApiError {
        ApiError::new(
            ErrorCode::InvalidArg,
            format!("invalid argument: {}", message.into()),
        )
    }

    pub fn failed(message: impl Into<String>) -> ApiError {
        ApiError::new(
            ErrorCode::OperationFailed,
            format!("operation failed: {}", message.into()),
        )
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(
            ErrorCode::Internal,
            format!("internal error: {}", message.into()),
        )
    }
}

impl From<crate::xml::DomainXmlError> for ApiError {
    fn from(e: crate::xml::DomainXmlError) -> ApiError {
        use crate::xml::DomainXmlError as E;
        let code = match e {
            E::Unsupported { .. } => ErrorCode::ConfigUnsupported,
            _ => ErrorCode::XmlError,
        };
        ApiError::new(code, e.to_string())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        ApiError::internal(e.to_string())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
