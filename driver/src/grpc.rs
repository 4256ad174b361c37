//! Thin gRPC adapters: request → driver core → response. Proto/domain
//! conversions live at the bottom of this file.

use std::time::Duration;

use futures::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use aimodel_proto::base::{
    base_plugin_server::BasePlugin, ConfigSchemaRequest, ConfigSchemaResponse, PluginInfoRequest, PluginInfoResponse,
    PluginType, SetConfigRequest, SetConfigResponse,
};
use aimodel_proto::drivers::{
    self as pb, driver_capabilities::FsIsolation, driver_server, fingerprint_response::HealthState,
    network_isolation_spec::NetworkIsolationMode,
};
use aimodel_proto::goplugin::{
    grpc_broker_server::GrpcBroker, grpc_controller_server::GrpcController, grpc_stdio_server::GrpcStdio,
};
use aimodel_proto::{goplugin, structs};

use crate::config::{PLUGIN_SCHEMA, TASK_SCHEMA};
use crate::driver::{
    AttrValue, Driver, Fingerprint, Health, TaskEvent, PLUGIN_API_VERSION, PLUGIN_NAME, PLUGIN_VERSION,
};
use crate::schema::to_spec;

/// Delay between answering GRPCController.Shutdown and stopping, so the reply
/// is flushed before the connection goes away.
const SHUTDOWN_REPLY_GRACE: Duration = Duration::from_millis(50);

/// Serves BasePlugin, Driver and go-plugin's services over one driver core.
#[derive(Clone)]
pub struct Service {
    driver: Driver,
}

impl Service {
    /// Wraps a driver core.
    pub fn new(driver: Driver) -> Self {
        Service { driver }
    }
}

#[tonic::async_trait]
impl BasePlugin for Service {
    async fn plugin_info(&self, _: Request<PluginInfoRequest>) -> Result<Response<PluginInfoResponse>, Status> {
        Ok(Response::new(PluginInfoResponse {
            r#type: PluginType::Driver as i32,
            plugin_api_versions: vec![PLUGIN_API_VERSION.into()],
            plugin_version: PLUGIN_VERSION.into(),
            name: PLUGIN_NAME.into(),
        }))
    }

    async fn config_schema(&self, _: Request<ConfigSchemaRequest>) -> Result<Response<ConfigSchemaResponse>, Status> {
        Ok(Response::new(ConfigSchemaResponse { spec: Some(to_spec(PLUGIN_SCHEMA)) }))
    }

    async fn set_config(&self, req: Request<SetConfigRequest>) -> Result<Response<SetConfigResponse>, Status> {
        let req = req.into_inner();
        if !req.plugin_api_version.is_empty() && req.plugin_api_version.trim_start_matches('v') != PLUGIN_API_VERSION {
            return Err(Status::invalid_argument(format!(
                "plugin_api_version {:?} is not supported (this plugin speaks {PLUGIN_API_VERSION})",
                req.plugin_api_version
            )));
        }
        self.driver.set_config(&req.msgpack_config, req.nomad_config.is_some()).map_err(|e| {
            tracing::error!(error = %e, "rejected plugin configuration");
            Status::from(e)
        })?;
        Ok(Response::new(SetConfigResponse {}))
    }
}

#[tonic::async_trait]
impl driver_server::Driver for Service {
    async fn init(&self, _: Request<pb::InitRequest>) -> Result<Response<pb::InitResponse>, Status> {
        tracing::debug!("init");
        Ok(Response::new(pb::InitResponse {}))
    }

    async fn task_config_schema(
        &self,
        _: Request<pb::TaskConfigSchemaRequest>,
    ) -> Result<Response<pb::TaskConfigSchemaResponse>, Status> {
        Ok(Response::new(pb::TaskConfigSchemaResponse { spec: Some(to_spec(TASK_SCHEMA)) }))
    }

    async fn capabilities(
        &self,
        _: Request<pb::CapabilitiesRequest>,
    ) -> Result<Response<pb::CapabilitiesResponse>, Status> {
        Ok(Response::new(pb::CapabilitiesResponse {
            capabilities: Some(pb::DriverCapabilities {
                send_signals: true,
                exec: true,
                fs_isolation: FsIsolation::Image as i32,
                network_isolation_modes: vec![NetworkIsolationMode::Host as i32, NetworkIsolationMode::Group as i32],
                must_create_network: false,
                mount_configs: pb::driver_capabilities::MountConfigs::UnknownMounts as i32, /* == ANY_MOUNTS */
                disable_log_collection: true,
                dynamic_workload_users: false,
            }),
        }))
    }

    async fn fingerprint(
        &self,
        _: Request<pb::FingerprintRequest>,
    ) -> Result<Response<BoxStream<pb::FingerprintResponse>>, Status> {
        let driver = self.driver.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(run_fingerprint(driver, tx));
        Ok(Response::new(ReceiverStream::new(rx).boxed()))
    }

    async fn task_events(
        &self,
        _: Request<pb::TaskEventsRequest>,
    ) -> Result<Response<BoxStream<pb::DriverTaskEvent>>, Status> {
        let mut events = self.driver.subscribe_events();
        let stop = self.driver.shutdown_token();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tx.closed() => break,
                    ev = events.recv() => ev,
                };
                match ev {
                    Ok(ev) => {
                        if tx.send(Ok(event_to_proto(ev))).await.is_err() {
                            break;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(dropped = n, "task events reader fell behind");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx).boxed()))
    }

    async fn shutdown(&self, _: Request<pb::ShutdownRequest>) -> Result<Response<pb::ShutdownResponse>, Status> {
        // Driver.Shutdown (Nomad 2.0.4+) precedes Kill on a graceful client stop.
        // Tasks must keep running, so there is nothing to tear down here.
        tracing::info!("nomad client is shutting down");
        Ok(Response::new(pb::ShutdownResponse {}))
    }
}

/// Sends the first fingerprint at once, then one every `fingerprint_period`
/// (re-read on every round, so SetConfig takes effect), until shutdown.
async fn run_fingerprint(driver: Driver, tx: tokio::sync::mpsc::Sender<Result<pb::FingerprintResponse, Status>>) {
    let stop = driver.shutdown_token();
    let mut config = driver.watch_config();
    let mut first = true;
    loop {
        let fp = tokio::select! {
            _ = stop.cancelled() => return,
            fp = driver.fingerprint(first) => fp,
        };
        first = false;
        if tx.send(Ok(fingerprint_to_proto(fp))).await.is_err() {
            return;
        }
        let period = config.borrow_and_update().fingerprint_period.0;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
            _ = tokio::time::sleep(period) => {}
            // A new configuration may change the period or the engine: re-probe.
            _ = config.changed() => {}
        }
    }
}

#[tonic::async_trait]
impl GrpcController for Service {
    async fn shutdown(&self, _: Request<goplugin::Empty>) -> Result<Response<goplugin::Empty>, Status> {
        tracing::info!("shutdown requested by the plugin host");
        let stop = self.driver.shutdown_token();
        tokio::spawn(async move {
            tokio::time::sleep(SHUTDOWN_REPLY_GRACE).await;
            stop.cancel();
        });
        Ok(Response::new(goplugin::Empty {}))
    }
}

#[tonic::async_trait]
impl GrpcStdio for Service {
    async fn stream_stdio(&self, _: Request<()>) -> Result<Response<BoxStream<goplugin::StdioData>>, Status> {
        // We never write to stdout after the handshake, so the stream carries
        // nothing; it stays open until shutdown like go-plugin's.
        let stop = self.driver.shutdown_token();
        let stream = futures::stream::once(async move {
            stop.cancelled().await;
        })
        .filter_map(|_| async { None });
        Ok(Response::new(stream.boxed()))
    }
}

#[tonic::async_trait]
impl GrpcBroker for Service {}

fn fingerprint_to_proto(fp: Fingerprint) -> pb::FingerprintResponse {
    let health = match fp.health {
        Health::Undetected => HealthState::Undetected,
        Health::Unhealthy => HealthState::Unhealthy,
        Health::Healthy => HealthState::Healthy,
    };
    pb::FingerprintResponse {
        attributes: fp.attributes.into_iter().map(|(k, v)| (k, attribute_to_proto(v))).collect(),
        health: health as i32,
        health_description: fp.description,
        err: String::new(),
    }
}

/// A domain attribute as Nomad's typed attribute.
pub fn attribute_to_proto(v: AttrValue) -> structs::Attribute {
    use structs::attribute::Value;
    let value = match v {
        AttrValue::Bool(b) => Value::BoolVal(b),
        AttrValue::Int(i) => Value::IntVal(i),
        AttrValue::Float(f) => Value::FloatVal(f),
        AttrValue::Str(s) => Value::StringVal(s),
    };
    structs::Attribute { value: Some(value), unit: String::new() }
}

fn event_to_proto(ev: TaskEvent) -> pb::DriverTaskEvent {
    pb::DriverTaskEvent {
        task_id: ev.task_id,
        alloc_id: ev.alloc_id,
        task_name: ev.task_name,
        timestamp: Some(prost_types::Timestamp::from(ev.at)),
        message: ev.message,
        annotations: ev.annotations.into_iter().collect(),
    }
}
