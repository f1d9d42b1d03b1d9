//! Embedding units: the model a unit names is loaded once (its manifest, config and weights
//! fetched through the session, which gets each into the verified cache), the unit computed on
//! a blocking thread, and the outcome reported to the connection's loop.

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use tessera_contributor::Assignment;
use tessera_engine::bert::{Bert, BertConfig};
use tessera_engine::cid::Cid;
use tessera_protocol::{Architecture, ModelManifest};
use tokio::sync::{mpsc, oneshot};

use super::{Done, Machine, perturb};

/// Computes one unit and reports its rows (or why not) with the GPU time it took.
pub(super) async fn run(machine: Machine, assignment: Assignment, done: mpsc::Sender<Done>) {
    let Assignment { unit, model, inputs, .. } = assignment;
    let started = Instant::now();
    let result = async {
        let bert = load(&machine, &model, &done).await?;
        let gpu = machine.gpu.clone();
        let mut vectors = tokio::task::spawn_blocking(move || pollster::block_on(bert.embed(&gpu, &inputs))).await??;
        if machine.perturb {
            perturb(&mut vectors, unit.0);
        }
        anyhow::Ok(vectors)
    }
    .await
    .map_err(|e| format!("{e:#}"));
    let busy_ms = started.elapsed().as_secs_f64() * 1e3;
    let _ = done.send(Done::Unit { unit, busy_ms, result }).await;
}

/// The model `id` names (a manifest CID), loaded once per process.
async fn load(machine: &Machine, id: &str, done: &mpsc::Sender<Done>) -> anyhow::Result<Arc<Bert>> {
    if let Some(bert) = machine.models.lock().await.get(id) {
        return Ok(bert.clone());
    }
    let manifest = ModelManifest::parse(&read(machine, id, done).await?).with_context(|| format!("model {id}"))?;
    if manifest.architecture != Architecture::Bert {
        bail!("model {} is a {:?} model; embedding units need a BERT encoder", manifest.name, manifest.architecture);
    }
    let config = BertConfig::from_json("config.json", &read(machine, manifest.file("config.json")?, done).await?)?;
    let weights: Cid = manifest.file("model.safetensors")?.parse()?;
    fetch(&weights.to_string(), done).await?;
    let mut blob = machine.blobs.get(&weights)?;
    let gpu = machine.gpu.clone();
    let name = format!("{} model.safetensors", manifest.name);
    let bert = Arc::new(tokio::task::spawn_blocking(move || Bert::load(&gpu, config, &name, &mut blob.file)).await??);
    machine.models.lock().await.insert(id.to_string(), bert.clone());
    eprintln!("tessera contribute: loaded {} ({id})", manifest.name);
    Ok(bert)
}

/// The bytes of a small blob, once the session has it in the verified cache.
async fn read(machine: &Machine, cid: &str, done: &mpsc::Sender<Done>) -> anyhow::Result<Vec<u8>> {
    fetch(cid, done).await?;
    let mut blob = machine.blobs.get(&cid.parse()?)?;
    let mut bytes = Vec::with_capacity(blob.len as usize);
    blob.file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Asks the session to get `cid` into the cache, checked, and waits until it has.
async fn fetch(cid: &str, done: &mpsc::Sender<Done>) -> anyhow::Result<()> {
    let (reply, fetched) = oneshot::channel();
    done.send(Done::Fetch { cid: cid.to_string(), reply }).await.map_err(|_| anyhow!("the connection ended"))?;
    fetched.await.map_err(|_| anyhow!("the connection ended while fetching {cid}"))?.map_err(|e| anyhow!("fetching {cid}: {e}"))
}
