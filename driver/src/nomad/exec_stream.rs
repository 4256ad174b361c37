//! ExecTaskStreaming (`nomad alloc exec`): setup first, then stdin data/close,
//! terminal sizes and heartbeats (empty messages) in; stdout/stderr, their
//! close markers and finally `exited` with the result out.

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Status, Streaming};

use aimodel_proto::drivers::{
    ExecTaskStreamingIoOperation as IoOp, ExecTaskStreamingRequest, ExecTaskStreamingResponse, ExitResult,
};

use crate::driver::Driver;
use crate::runtime::LogStream;

/// Runs one interactive exec.
pub async fn run(
    driver: Driver,
    mut input: Streaming<ExecTaskStreamingRequest>,
) -> Result<BoxStream<ExecTaskStreamingResponse>, Status> {
    let first = input.message().await?.ok_or_else(|| Status::invalid_argument("exec stream closed before setup"))?;
    let setup = first.setup.ok_or_else(|| Status::invalid_argument("the first exec message must be setup"))?;
    let session = driver.exec_interactive(&setup.task_id, &setup.command, setup.tty).await?;
    let control = session.control();
    let (mut stdin, mut output) = (session.stdin, session.output);

    // Input: stdin bytes, stdin close, resizes; heartbeats are ignored.
    let resizer = control.clone();
    tokio::spawn(async move {
        while let Ok(Some(msg)) = input.message().await {
            if let Some(size) = msg.tty_size {
                resizer.resize(size.height, size.width).await;
            }
            if let Some(op) = msg.stdin {
                if !op.data.is_empty() && stdin.write_all(&op.data).await.is_err() {
                    break;
                }
                if op.close {
                    let _ = stdin.shutdown().await;
                    break;
                }
            }
        }
    });

    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let data = |data: Vec<u8>| IoOp { data, close: false };
        while let Some(chunk) = output.next().await {
            let msg = match chunk {
                Ok((LogStream::Stdout, b)) => ExecTaskStreamingResponse { stdout: Some(data(b)), ..Default::default() },
                Ok((LogStream::Stderr, b)) => ExecTaskStreamingResponse { stderr: Some(data(b)), ..Default::default() },
                Err(_) => break,
            };
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
        }
        let close = IoOp { data: Vec::new(), close: true };
        let _ = tx.send(Ok(ExecTaskStreamingResponse { stdout: Some(close.clone()), ..Default::default() })).await;
        let _ = tx.send(Ok(ExecTaskStreamingResponse { stderr: Some(close), ..Default::default() })).await;
        let code = i32::try_from(control.exit_code().await).unwrap_or(-1);
        let result = ExitResult { exit_code: code, signal: 0, oom_killed: false };
        let _ =
            tx.send(Ok(ExecTaskStreamingResponse { exited: true, result: Some(result), ..Default::default() })).await;
    });
    Ok(ReceiverStream::new(rx).boxed())
}
