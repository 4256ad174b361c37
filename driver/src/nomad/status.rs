//! The one place where driver errors become gRPC statuses, with Nomad's
//! RecoverableError detail where a retry can help (nomad-wire.md §5).

use prost::Message;
use tonic::{Code, Status};

use aimodel_proto::structs::RecoverableError;

use crate::driver::error::DriverError;
use crate::runtime::RuntimeError;

/// `google.rpc.Status`, the body of the `grpc-status-details-bin` trailer.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

const RECOVERABLE_TYPE_URL: &str = "type.googleapis.com/hashicorp.nomad.plugins.shared.structs.RecoverableError";

/// A status carrying `RecoverableError{recoverable}` as a detail.
pub fn with_recoverable(code: Code, message: String, recoverable: bool) -> Status {
    let detail = prost_types::Any {
        type_url: RECOVERABLE_TYPE_URL.into(),
        value: RecoverableError { recoverable }.encode_to_vec(),
    };
    let body = RpcStatus { code: code as i32, message: message.clone(), details: vec![detail] };
    Status::with_details(code, message, body.encode_to_vec().into())
}

/// Reads the RecoverableError detail of a status, if any (used by the simulator and tests).
pub fn recoverable_detail(status: &Status) -> Option<bool> {
    let body = RpcStatus::decode(status.details()).ok()?;
    body.details
        .iter()
        .find(|d| d.type_url == RECOVERABLE_TYPE_URL)
        .and_then(|d| RecoverableError::decode(d.value.as_slice()).ok())
        .map(|r| r.recoverable)
}

impl From<DriverError> for Status {
    fn from(e: DriverError) -> Status {
        let message = e.to_string();
        if e.is_recoverable() {
            // Go drivers use FailedPrecondition for recoverable errors; Nomad
            // restarts the task (e.g. while the cache is being warmed).
            return with_recoverable(Code::FailedPrecondition, message, true);
        }
        match e {
            DriverError::PluginConfig(_) | DriverError::TaskConfig(_) => Status::invalid_argument(message),
            DriverError::Runtime(RuntimeError::ImageNotFound { .. } | RuntimeError::NotFound { .. }) => {
                Status::not_found(message)
            }
            DriverError::Runtime(RuntimeError::Conflict { .. }) => Status::already_exists(message),
            DriverError::Runtime(_) | DriverError::AgentSpawn { .. } => Status::internal(message),
            DriverError::TaskNotFound { .. } | DriverError::ContainerGone { .. } => Status::not_found(message),
            DriverError::TaskExists { .. } => Status::already_exists(message),
            DriverError::StartFailed { .. } | DriverError::StillRunning { .. } | DriverError::AgentMissing => {
                Status::failed_precondition(message)
            }
            DriverError::ShuttingDown => Status::unavailable(message),
            DriverError::StopTimeout { .. } | DriverError::ExecTimeout { .. } => Status::deadline_exceeded(message),
            DriverError::BadHandle(_) | DriverError::BadSignal { .. } | DriverError::BadRequest { .. } => {
                Status::invalid_argument(message)
            }
            // Recoverable, handled above.
            DriverError::ModelIncomplete { .. }
            | DriverError::CacheUnavailable { .. }
            | DriverError::PrewarmFailed { .. } => with_recoverable(Code::FailedPrecondition, message, true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recoverable_detail_round_trips() {
        let s = with_recoverable(Code::FailedPrecondition, "engine down".into(), true);
        assert_eq!(recoverable_detail(&s), Some(true));
        assert_eq!(recoverable_detail(&Status::internal("x")), None);
        let e: Status =
            DriverError::Runtime(RuntimeError::Unreachable { endpoint: "e".into(), reason: "r".into() }).into();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert_eq!(recoverable_detail(&e), Some(true));
        // A missing agent is final: Nomad must not restart the task forever.
        let missing: Status = DriverError::AgentMissing.into();
        assert_eq!(recoverable_detail(&missing), None);
        let cache: Status = DriverError::CacheUnavailable { path: "/c".into(), reason: "hung".into() }.into();
        assert_eq!(recoverable_detail(&cache), Some(true));
    }
}
