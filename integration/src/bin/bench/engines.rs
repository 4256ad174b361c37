//! The real-engine benches: llama-server started by hand and through the
//! driver, to the first completion token; and the tiny model prewarmed for the demo.

use anyhow::{bail, Result};

use super::median;

/// `docker run` of the llama-server image on the tiny GGUF model (prewarmed by
/// the agent into an HF cache) to its first streamed completion token: the
/// by-hand half of the comparison with StartTask through the driver.
pub(crate) async fn engine_first_token(runs: usize) -> Result<()> {
    use aimodel_integration::engines::{
        engine_image, prewarm_tiny_model, time_docker_run_to_first_token, EngineImage, TINY_GGUF_FILES,
    };
    let image = engine_image(EngineImage::LlamaServer)?;
    let hf_home = tempfile::tempdir()?;
    let model = prewarm_tiny_model(hf_home.path()).await?;
    let file = model.snapshot_file(TINY_GGUF_FILES[0].0);
    // One run first, not counted: the image's layers and the model's pages are warm afterwards.
    time_docker_run_to_first_token(&image, hf_home.path(), &file).await?;
    let (mut run, mut healthy, mut token) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = time_docker_run_to_first_token(&image, hf_home.path(), &file).await?;
        run.push(t.docker_run.as_secs_f64() * 1000.0);
        healthy.push(t.healthy.as_secs_f64() * 1000.0);
        token.push(t.first_token.as_secs_f64() * 1000.0);
    }
    println!("| `docker run -d` of {image} returned (median of {runs}) | {:.0} ms |", median(run));
    println!("| … `/health` answers 200 (median of {runs}) | {:.0} ms |", median(healthy));
    println!("| … first streamed token of a chat completion (median of {runs}) | {:.0} ms |", median(token));
    Ok(())
}

/// StartTask of a `llamacpp` task through the driver against `docker run` of
/// the same image and llama-server arguments by hand, alternating, each to the
/// first streamed token of the same request on the tiny GGUF model.
pub(crate) async fn llamacpp_first_token(runs: usize) -> Result<()> {
    use aimodel_integration::engines::{
        engine_image, prewarm_tiny_model, start_plugin_for_llama, time_docker_run_to_first_token,
        time_start_task_to_first_token, EngineImage, TINY_GGUF_FILES,
    };
    let image = engine_image(EngineImage::LlamaServer)?;
    let (hf_home, tmp, data) = (tempfile::tempdir()?, tempfile::tempdir()?, tempfile::tempdir()?);
    let model = prewarm_tiny_model(hf_home.path()).await?;
    let (name, file) = (TINY_GGUF_FILES[0].0, model.snapshot_file(TINY_GGUF_FILES[0].0));
    let live = start_plugin_for_llama(hf_home.path(), &image, tmp.path()).await?;
    // One run of each first, not counted: image layers and the model's pages are warm afterwards.
    time_start_task_to_first_token(&live, data.path(), name).await?;
    time_docker_run_to_first_token(&image, hf_home.path(), &file).await?;
    let (mut d, mut h) = ([Vec::new(), Vec::new(), Vec::new()], [Vec::new(), Vec::new(), Vec::new()]);
    for _ in 0..runs {
        let t = time_start_task_to_first_token(&live, data.path(), name).await?;
        for (v, x) in d.iter_mut().zip([t.docker_run, t.healthy, t.first_token]) {
            v.push(x.as_secs_f64() * 1000.0);
        }
        let t = time_docker_run_to_first_token(&image, hf_home.path(), &file).await?;
        for (v, x) in h.iter_mut().zip([t.docker_run, t.healthy, t.first_token]) {
            v.push(x.as_secs_f64() * 1000.0);
        }
    }
    live.kill().await?;
    let [d0, d1, d2] = d.map(median);
    let [h0, h1, h2] = h.map(median);
    println!("| median of {runs}, {image} | through the driver | `docker run` by hand | ratio |");
    println!("|---|---|---|---|");
    println!("| StartTask / `docker run -d` returned | {d0:.0} ms | {h0:.0} ms | {:.2}× |", d0 / h0);
    println!("| `/health` answers 200 | {d1:.0} ms | {h1:.0} ms | {:.2}× |", d1 / h1);
    println!("| first streamed completion token | {d2:.0} ms | {h2:.0} ms | {:.2}× |", d2 / h2);
    Ok(())
}

/// For scripts/demo: the tiny GGUF model published on a local hub and
/// prewarmed by the agent into the HF cache at `hf_home`; prints the commit.
pub(crate) async fn prewarm_tiny(hf_home: &str) -> Result<()> {
    if hf_home.is_empty() {
        bail!("usage: bench prewarm-tiny HF_HOME");
    }
    let model = aimodel_integration::engines::prewarm_tiny_model(std::path::Path::new(hf_home)).await?;
    println!("{}", model.commit);
    Ok(())
}
