//! The HTTP side (axum): `/status` (JSON), `/metrics` (Prometheus text) and the JSON API the
//! fleet CLI uses. Reads go to the store directly; writes go through the engine, the store's
//! only writer.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fedge_proto::PublicKey;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::config::JobSpec;
use crate::engine::Command;
use crate::error::StoreError;
use crate::lifecycle::OpError;
use crate::metrics::{Gauges, Stats};
use crate::records::{JobPhase, JobRecord};
use crate::store::Store;

/// Who this aggregator is, for `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    pub fleet: String,
    pub id: String,
    pub public_key: String,
    pub broker: String,
    pub max_packet_bytes: usize,
}

/// Shared by every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    pub stats: Arc<Stats>,
    /// Requests to the engine (registry and job writes).
    pub commands: mpsc::Sender<Command>,
    pub info: Arc<Info>,
}

/// An error answer: `{"error": "..."}` with its status.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        let code = match e {
            OpError::Invalid(_) => StatusCode::BAD_REQUEST,
            OpError::Exists(_) | OpError::Conflict(_) => StatusCode::CONFLICT,
            OpError::NotFound(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(code, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Every route.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/api/jobs", get(jobs).post(create_job))
        .route("/api/jobs/{job}", get(job))
        .route("/api/jobs/{job}/stop", post(stop_job))
        .route("/api/jobs/{job}/rounds", get(rounds))
        .route("/api/jobs/{job}/model", get(model))
        .route("/api/devices", get(devices).post(register))
        .route("/api/devices/{id}/revoke", post(revoke))
        .with_state(state)
}

/// Serves until the listener fails.
///
/// # Errors
/// The listener's accept errors.
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}

fn job_view(store: &Store, rec: &JobRecord) -> Result<Value, StoreError> {
    let open = match rec.phase {
        JobPhase::Running => store
            .rounds(&rec.spec.id)?
            .into_iter()
            .find(|r| r.round == rec.current_round),
        JobPhase::Finished => None,
    };
    Ok(json!({
        "id": rec.spec.id,
        "phase": rec.phase,
        "round": rec.current_round,
        "rounds": rec.spec.rounds,
        "model_version": rec.model_version,
        "param_count": rec.param_count,
        "strategy": rec.spec.strategy.name,
        "epsilon_spent": crate::lifecycle::epsilon_after(&rec.spec, rec.model_version),
        "epsilon_budget": rec.spec.dp_epsilon_budget,
        "dp_delta": rec.spec.dp_delta,
        "finish_reason": rec.finish_reason,
        "open_round": open,
        "spec": rec.spec,
    }))
}

fn gauges(store: &Store) -> Result<Gauges, StoreError> {
    let devices = store.devices()?;
    let jobs = store.jobs()?;
    Ok(Gauges {
        jobs: jobs
            .iter()
            .map(|j| {
                (
                    j.spec.id.clone(),
                    j.current_round,
                    j.model_version,
                    j.phase == JobPhase::Finished,
                )
            })
            .collect(),
        devices_registered: devices.len() as u64,
        devices_revoked: devices.iter().filter(|(_, d, _)| d.revoked).count() as u64,
        devices_seen: devices.iter().filter(|(_, _, seq)| seq.is_some()).count() as u64,
    })
}

async fn status(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    let snap = s.stats.snapshot();
    let g = gauges(&s.store)?;
    let jobs = s
        .store
        .jobs()?
        .iter()
        .map(|j| job_view(&s.store, j))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({
        "aggregator": *s.info,
        "jobs": jobs,
        "devices": { "registered": g.devices_registered, "revoked": g.devices_revoked, "seen": g.devices_seen },
        "updates": {
            "accepted": snap.accepted,
            "accepted_total": snap.accepted.values().sum::<u64>(),
            "rejected": snap.rejected,
            "rejected_total": snap.rejected.values().sum::<u64>(),
            "bytes": snap.update_bytes,
        },
        "published_bytes": snap.published_bytes,
        "rounds_completed": snap.rounds_completed,
    })))
}

async fn metrics(State(s): State<AppState>) -> ApiResult<Response> {
    let text = crate::metrics::render(&s.stats.snapshot(), &gauges(&s.store)?);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

async fn jobs(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    let jobs = s
        .store
        .jobs()?
        .iter()
        .map(|j| job_view(&s.store, j))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(Value::Array(jobs)))
}

fn not_found(what: String) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("{what} not found"))
}

async fn job(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let rec = s
        .store
        .job(&id)?
        .ok_or_else(|| not_found(format!("job {id}")))?;
    Ok(Json(job_view(&s.store, &rec)?))
}

async fn stop_job(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let rec = ask(&s, |reply| Command::StopJob { id, reply }).await?;
    Ok(Json(job_view(&s.store, &rec)?))
}

async fn rounds(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    s.store
        .job(&id)?
        .ok_or_else(|| not_found(format!("job {id}")))?;
    Ok(Json(
        serde_json::to_value(s.store.rounds(&id)?).unwrap_or_default(),
    ))
}

#[derive(Debug, Deserialize)]
struct ModelQuery {
    version: Option<u64>,
}

async fn model(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<ModelQuery>,
) -> ApiResult<Json<Value>> {
    let rec = s
        .store
        .job(&id)?
        .ok_or_else(|| not_found(format!("job {id}")))?;
    let version = q.version.unwrap_or(rec.model_version);
    let params = s
        .store
        .model(&id, version)?
        .ok_or_else(|| not_found(format!("model {id}/{version}")))?;
    let sha = fedge_proto::hex::encode32(&crate::codec::model_sha256(&params)).to_string();
    Ok(Json(
        json!({ "job": id, "version": version, "sha256": sha, "params": params }),
    ))
}

async fn devices(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    let list: Vec<Value> = s
        .store
        .devices()?
        .into_iter()
        .map(|(id, d, last_seq)| {
            json!({
                "id": id,
                "public_key": d.public_key,
                "revoked": d.revoked,
                "registered_unix_ms": d.registered_unix_ms,
                "last_seq": last_seq,
            })
        })
        .collect();
    Ok(Json(Value::Array(list)))
}

async fn ask<T>(
    s: &AppState,
    make: impl FnOnce(oneshot::Sender<Result<T, OpError>>) -> Command,
) -> ApiResult<T> {
    let (tx, rx) = oneshot::channel();
    let gone = || {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the aggregator is stopping".into(),
        )
    };
    s.commands.send(make(tx)).await.map_err(|_| gone())?;
    Ok(rx.await.map_err(|_| gone())??)
}

#[derive(Debug, Deserialize)]
struct RegisterBody {
    id: String,
    public_key: String,
}

async fn register(
    State(s): State<AppState>,
    Json(body): Json<RegisterBody>,
) -> ApiResult<Response> {
    let key = PublicKey::from_hex(&body.public_key).map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "public_key must be 64 hex characters".into(),
        )
    })?;
    let id = body.id.clone();
    let (rec, changed) = ask(&s, |reply| Command::Register { id, key, reply }).await?;
    let code = if changed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        code,
        Json(json!({ "id": body.id, "public_key": rec.public_key, "revoked": rec.revoked })),
    )
        .into_response())
}

async fn revoke(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let rec = ask(&s, |reply| Command::Revoke {
        id: id.clone(),
        reply,
    })
    .await?;
    Ok(Json(
        json!({ "id": id, "public_key": rec.public_key, "revoked": rec.revoked }),
    ))
}

/// Body: a job in TOML or JSON (JSON when it starts with `{`).
async fn create_job(State(s): State<AppState>, body: String) -> ApiResult<Response> {
    let spec = JobSpec::parse(&body, s.info.max_packet_bytes)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let rec = ask(&s, |reply| Command::CreateJob {
        spec: Box::new(spec),
        reply,
    })
    .await?;
    Ok((StatusCode::CREATED, Json(job_view(&s.store, &rec)?)).into_response())
}
