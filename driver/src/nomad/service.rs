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
use aimodel_proto::goplugin;
use aimodel_proto::goplugin::{
    grpc_broker_server::GrpcBroker, grpc_controller_server::GrpcController, grpc_stdio_server::GrpcStdio,
};

use crate::config::{PLUGIN_SCHEMA, TASK_SCHEMA};
use crate::driver::error::DriverError;
use crate::driver::{Driver, PLUGIN_API_VERSION, PLUGIN_NAME, PLUGIN_VERSION};
use crate::nomad::convert::{
    attribute_to_proto, duration, event_to_proto, exit_to_proto, stats_to_proto, task_from_proto,
};
use crate::nomad::hclspec::to_spec;
use crate::types::DRIVER_STATE_VERSION;
use crate::types::{Fingerprint, Health};

/// Delay between answering GRPCController.Shutdown and stopping, so the reply
/// is flushed before the connection goes away.
const SHUTDOWN_REPLY_GRACE: Duration = Duration::from_millis(50);

/// Serves BasePlugin, Driver and go-plugin's services over one driver core.
#[derive(Debug, Clone)]
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
        let applied = crate::nomad::decode::plugin_config(&req.msgpack_config)
            .map_err(DriverError::PluginConfig)
            .and_then(|cfg| self.driver.set_config(cfg, req.nomad_config.is_some()));
        applied.map_err(|e| {
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
                // Nomad skips logmon (and the FIFOs) only when this is true.
                disable_log_collection: self.driver.config().disable_log_collection,
                dynamic_workload_users: false,
            }),
        }))
    }

    async fn fingerprint(
        &self,
        _: Request<pb::FingerprintRequest>,
    ) -> Result<Response<BoxStream<pb::FingerprintResponse>>, Status> {
        let stream = ReceiverStream::new(self.driver.fingerprints()).map(|fp| Ok(fingerprint_to_proto(fp)));
        Ok(Response::new(stream.boxed()))
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

    async fn start_task(&self, req: Request<pb::StartTaskRequest>) -> Result<Response<pb::StartTaskResponse>, Status> {
        let config = req.into_inner().task.ok_or_else(|| Status::invalid_argument("StartTask without a task"))?;
        let task = task_from_proto(&config);
        let started = match crate::nomad::decode::task_config(&config.msgpack_driver_config) {
            Ok(cfg) => self.driver.start_task(task, cfg).await,
            Err(e) => Err(DriverError::TaskConfig(e)),
        };
        let started = started.and_then(|s| Ok((s.state.encode().map_err(DriverError::BadHandle)?, s)));
        let (driver_state, _started) = started.map_err(|e| {
            tracing::warn!(task_id = %config.id, error = %e, "start failed");
            Status::from(e)
        })?;
        Ok(Response::new(pb::StartTaskResponse {
            result: pb::start_task_response::Result::Success as i32,
            driver_error_msg: String::new(),
            // Echo the TaskConfig: without it Nomad cannot recover the task later.
            handle: Some(pb::TaskHandle {
                version: DRIVER_STATE_VERSION,
                config: Some(config),
                state: pb::TaskState::Running as i32,
                driver_state,
            }),
            // No driver address (the server is reached through Nomad's own port
            // mapping), so no network override: Nomad would otherwise rewrite the
            // task's port env and service addresses from it
            // (`client/serviceregistration/address.go`).
            network_override: None,
        }))
    }

    async fn wait_task(&self, req: Request<pb::WaitTaskRequest>) -> Result<Response<pb::WaitTaskResponse>, Status> {
        let r = self.driver.wait_task(&req.into_inner().task_id).await?;
        Ok(Response::new(pb::WaitTaskResponse { result: Some(exit_to_proto(&r)), err: r.err.unwrap_or_default() }))
    }

    async fn stop_task(&self, req: Request<pb::StopTaskRequest>) -> Result<Response<pb::StopTaskResponse>, Status> {
        let r = req.into_inner();
        self.driver.stop_task(&r.task_id, duration(r.timeout.as_ref()), &r.signal).await?;
        Ok(Response::new(pb::StopTaskResponse {}))
    }

    async fn destroy_task(
        &self,
        req: Request<pb::DestroyTaskRequest>,
    ) -> Result<Response<pb::DestroyTaskResponse>, Status> {
        let r = req.into_inner();
        self.driver.destroy_task(&r.task_id, r.force).await?;
        Ok(Response::new(pb::DestroyTaskResponse {}))
    }

    async fn recover_task(
        &self,
        req: Request<pb::RecoverTaskRequest>,
    ) -> Result<Response<pb::RecoverTaskResponse>, Status> {
        // Nomad fills only `handle`; the id comes from handle.config.id.
        let handle = req.into_inner().handle.ok_or_else(|| Status::invalid_argument("RecoverTask without a handle"))?;
        let config = handle.config.ok_or_else(|| Status::invalid_argument("RecoverTask handle without config"))?;
        let task = task_from_proto(&config);
        self.driver.recover_task(task, &handle.driver_state).await.map_err(|e| {
            tracing::warn!(task_id = %config.id, error = %e, "recovery failed");
            Status::from(e)
        })?;
        Ok(Response::new(pb::RecoverTaskResponse {}))
    }

    async fn inspect_task(
        &self,
        req: Request<pb::InspectTaskRequest>,
    ) -> Result<Response<pb::InspectTaskResponse>, Status> {
        let e = self.driver.inspect_task(&req.into_inner().task_id)?;
        let exit = e.exit_result();
        let completed = *e.completed_at.lock().unwrap_or_else(|p| p.into_inner());
        let mut attributes: std::collections::HashMap<String, String> = Default::default();
        attributes.insert("container_id".into(), e.state.container_id.clone());
        attributes.insert("image".into(), e.state.image.clone());
        attributes.insert("engine".into(), e.state.engine.as_str().to_string());
        Ok(Response::new(pb::InspectTaskResponse {
            task: Some(pb::TaskStatus {
                id: e.task.id.clone(),
                name: e.task.name.clone(),
                state: if exit.is_some() { pb::TaskState::Exited } else { pb::TaskState::Running } as i32,
                // Go clients need both timestamps non-nil; zero means "not yet".
                started_at: Some(prost_types::Timestamp::from(e.started_at)),
                completed_at: Some(completed.map(prost_types::Timestamp::from).unwrap_or_default()),
                result: exit.as_ref().map(exit_to_proto),
            }),
            driver: Some(pb::TaskDriverStatus { attributes }),
            network_override: None,
        }))
    }

    async fn task_stats(
        &self,
        req: Request<pb::TaskStatsRequest>,
    ) -> Result<Response<BoxStream<pb::TaskStatsResponse>>, Status> {
        let r = req.into_inner();
        let interval = duration(r.collection_interval.as_ref()).max(Duration::from_millis(100));
        let samples = self.driver.stats_stream(&r.task_id, interval).await?;
        let id = r.task_id;
        let stream = ReceiverStream::new(samples)
            .map(move |u| Ok(pb::TaskStatsResponse { stats: Some(stats_to_proto(&id, &u)) }));
        Ok(Response::new(stream.boxed()))
    }

    async fn signal_task(
        &self,
        req: Request<pb::SignalTaskRequest>,
    ) -> Result<Response<pb::SignalTaskResponse>, Status> {
        let r = req.into_inner();
        self.driver.signal_task(&r.task_id, &r.signal).await?;
        Ok(Response::new(pb::SignalTaskResponse {}))
    }

    async fn exec_task(&self, req: Request<pb::ExecTaskRequest>) -> Result<Response<pb::ExecTaskResponse>, Status> {
        let r = req.into_inner();
        let out = self.driver.exec_task(&r.task_id, &r.command, duration(r.timeout.as_ref())).await?;
        Ok(Response::new(pb::ExecTaskResponse {
            stdout: out.stdout,
            stderr: out.stderr,
            result: Some(pb::ExitResult {
                exit_code: i32::try_from(out.exit_code).unwrap_or(if out.exit_code < 0 { i32::MIN } else { i32::MAX }),
                signal: 0,
                oom_killed: false,
            }),
        }))
    }

    async fn exec_task_streaming(
        &self,
        req: Request<tonic::Streaming<pb::ExecTaskStreamingRequest>>,
    ) -> Result<Response<BoxStream<pb::ExecTaskStreamingResponse>>, Status> {
        let stream = crate::nomad::exec_stream::run(self.driver.clone(), req.into_inner()).await?;
        Ok(Response::new(stream))
    }

    async fn shutdown(&self, _: Request<pb::ShutdownRequest>) -> Result<Response<pb::ShutdownResponse>, Status> {
        // Driver.Shutdown (Nomad 2.0.4+) precedes Kill on a graceful client stop.
        // Tasks must keep running, so there is nothing to tear down here.
        tracing::info!("nomad client is shutting down");
        Ok(Response::new(pb::ShutdownResponse {}))
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
