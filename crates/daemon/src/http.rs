//! The REST API on the daemon's unix socket (axum on hyper). Handlers are thin: they parse,
//! call the [`Manager`], and map [`ApiError`] to a status and an [`ErrorBody`].

use crate::error::ApiError;
use crate::manager::Manager;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use rvirt_api::rest::*;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

type M = State<Arc<Manager>>;
type R<T> = Result<Json<T>, ApiError>;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            error: self.message,
            code: self.code,
        };
        (status, Json(body)).into_response()
    }
}

#[derive(Serialize)]
struct Empty {}

use serde::Serialize;

fn ok() -> R<Empty> {
    Ok(Json(Empty {}))
}

pub fn router(mgr: Arc<Manager>) -> Router {
    let d = "/v1/domains/{name}";
    let n = "/v1/networks/{name}";
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/version", get(version))
        .route("/v1/domains", get(list).post(define))
        .route(d, get(info).delete(undefine))
        .route(&format!("{d}/xml"), get(dumpxml))
        .route(&format!("{d}/start"), post(start))
        .route(&format!("{d}/shutdown"), post(shutdown))
        .route(&format!("{d}/reboot"), post(reboot))
        .route(&format!("{d}/reset"), post(reset))
        .route(&format!("{d}/destroy"), post(destroy))
        .route(&format!("{d}/suspend"), post(suspend))
        .route(&format!("{d}/resume"), post(resume))
        .route(&format!("{d}/autostart"), put(autostart))
        .route(&format!("{d}/disks"), get(disks))
        .route(&format!("{d}/interfaces"), get(interfaces))
        .route(&format!("{d}/vcpus"), get(vcpus).put(setvcpus))
        .route(&format!("{d}/vcpucount"), get(vcpucount))
        .route(&format!("{d}/memory"), put(setmem))
        .route(&format!("{d}/memstats"), get(memstats))
        .route(&format!("{d}/memstats/period"), put(memstats_period))
        .route(&format!("{d}/devices"), post(attach_device))
        .route(&format!("{d}/devices/detach"), post(detach_device))
        .route(&format!("{d}/media"), post(change_media))
        .route(&format!("{d}/devices/{{key}}"), delete(detach_key))
        .route(&format!("{d}/stats"), get(domstats))
        .route(&format!("{d}/monitor"), post(monitor))
        .route(&format!("{d}/vcpupin"), get(pins).post(vcpupin))
        .route(&format!("{d}/emulatorpin"), post(emulatorpin))
        .route(&format!("{d}/console"), get(console))
        .route(&format!("{d}/ifaddr"), get(domifaddr))
        .route("/v1/networks", get(net_list).post(net_define))
        .route(n, get(net_info).delete(net_undefine))
        .route(&format!("{n}/xml"), get(net_xml))
        .route(&format!("{n}/start"), post(net_start))
        .route(&format!("{n}/destroy"), post(net_destroy))
        .route(&format!("{n}/autostart"), put(net_autostart))
        .route(&format!("{n}/dhcp-leases"), get(net_leases))
        .with_state(mgr)
}

async fn version() -> Json<serde_json::Value> {
    Json(serde_json::json!({"name": "rvirtd", "version": env!("CARGO_PKG_VERSION"), "api": "v1"}))
}

async fn list(State(m): M) -> Json<Vec<DomainSummary>> {
    Json(m.list())
}

async fn define(State(m): M, Json(req): Json<DefineRequest>) -> R<DefineResponse> {
    let (resp, slot) = m.define(&req.xml, req.transient).await?;
    if req.transient {
        let started = {
            let _op = slot.op.lock().await;
            m.start_locked(&resp.name, &slot).await
        };
        if let Err(e) = started {
            m.remove_slot(&resp.name, &slot);
            return Err(e);
        }
    }
    Ok(Json(resp))
}

async fn info(State(m): M, Path(name): Path<String>) -> R<DomainInfo> {
    Ok(Json(m.info_live(&name).await?))
}

/// `?nvram=true` deletes a UEFI guest's variable store, `?keep_nvram=true` keeps it (virsh
/// undefine --nvram / --keep-nvram); with neither, a domain whose store exists is not undefined.
#[derive(Deserialize)]
struct UndefineQuery {
    #[serde(default)]
    nvram: bool,
    #[serde(default)]
    keep_nvram: bool,
}

async fn undefine(
    State(m): M,
    Path(name): Path<String>,
    Query(q): Query<UndefineQuery>,
) -> R<Empty> {
    let policy = match (q.nvram, q.keep_nvram) {
        (true, true) => {
            return Err(ApiError::new(
                ErrorCode::InvalidArg,
                "nvram and keep_nvram are mutually exclusive; give one",
            ))
        }
        (true, false) => crate::manager::NvramPolicy::Remove,
        (false, true) => crate::manager::NvramPolicy::Keep,
        (false, false) => crate::manager::NvramPolicy::Refuse,
    };
    m.undefine(&name, policy).await?;
    ok()
}

#[derive(Deserialize)]
struct XmlQuery {
    #[serde(default)]
    inactive: bool,
}

async fn dumpxml(State(m): M, Path(name): Path<String>, Query(q): Query<XmlQuery>) -> R<XmlBody> {
    Ok(Json(XmlBody {
        xml: m.xml(&name, q.inactive)?,
    }))
}

async fn start(State(m): M, Path(name): Path<String>, body: axum::body::Bytes) -> R<Empty> {
    // The body is optional: none (or empty) means a normal start.
    let req: StartRequest = if body.iter().all(u8::is_ascii_whitespace) {
        StartRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::invalid_arg(format!("start request body: {e}")))?
    };
    m.start_paused(&name, req.paused).await?;
    ok()
}

async fn shutdown(State(m): M, Path(name): Path<String>, body: axum::body::Bytes) -> R<Empty> {
    // The body is optional: none (or empty) means "press the button and return".
    let req: ShutdownRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ShutdownRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::invalid_arg(format!("shutdown request body: {e}")))?
    };
    let timeout = req.timeout_secs.map(Duration::from_secs);
    m.shutdown(&name, timeout).await?;
    ok()
}

async fn reboot(State(m): M, Path(name): Path<String>) -> R<Empty> {
    m.reboot(&name).await?;
    ok()
}

async fn reset(State(m): M, Path(name): Path<String>) -> R<Empty> {
    m.reset(&name).await?;
    ok()
}

async fn destroy(State(m): M, Path(name): Path<String>) -> R<Empty> {
    m.destroy(&name).await?;
    ok()
}

async fn suspend(State(m): M, Path(name): Path<String>) -> R<Empty> {
    m.suspend(&name).await?;
    ok()
}

async fn resume(State(m): M, Path(name): Path<String>) -> R<Empty> {
    m.resume(&name).await?;
    ok()
}

async fn autostart(
    State(m): M,
    Path(name): Path<String>,
    Json(req): Json<AutostartRequest>,
) -> R<Empty> {
    m.set_autostart(&name, req.enable).await?;
    ok()
}

async fn disks(State(m): M, Path(name): Path<String>) -> R<Vec<BlockDevice>> {
    Ok(Json(m.block_devices(&name)?))
}

async fn interfaces(State(m): M, Path(name): Path<String>) -> R<Vec<NetInterface>> {
    Ok(Json(m.interfaces(&name)?))
}

async fn vcpus(State(m): M, Path(name): Path<String>) -> R<Vec<VcpuInfo>> {
    Ok(Json(m.vcpu_info(&name).await?))
}

async fn memstats(State(m): M, Path(name): Path<String>) -> R<MemStats> {
    Ok(Json(m.mem_stats_live(&name).await?))
}

async fn memstats_period(
    State(m): M,
    Path(name): Path<String>,
    Json(r): Json<StatsPeriodRequest>,
) -> R<Empty> {
    m.set_stats_period(&name, &r).await?;
    ok()
}

async fn setmem(State(m): M, Path(name): Path<String>, Json(r): Json<MemoryRequest>) -> R<Empty> {
    m.set_memory(&name, &r).await?;
    ok()
}

async fn setvcpus(State(m): M, Path(name): Path<String>, Json(r): Json<VcpusRequest>) -> R<Empty> {
    m.set_vcpus(&name, &r).await?;
    ok()
}

async fn vcpucount(State(m): M, Path(name): Path<String>) -> R<VcpuCount> {
    Ok(Json(m.vcpu_count(&name)?))
}

async fn attach_device(
    State(m): M,
    Path(name): Path<String>,
    Json(r): Json<AttachRequest>,
) -> R<AttachResponse> {
    Ok(Json(m.attach_device(&name, &r).await?))
}

async fn change_media(
    State(m): M,
    Path(name): Path<String>,
    Json(r): Json<ChangeMediaRequest>,
) -> R<Empty> {
    m.change_media(&name, &r).await?;
    ok()
}

async fn detach_device(
    State(m): M,
    Path(name): Path<String>,
    Json(r): Json<DetachRequest>,
) -> R<Empty> {
    m.detach_device(&name, &r).await?;
    ok()
}

#[derive(Deserialize)]
struct DetachQuery {
    #[serde(default)]
    live: bool,
    #[serde(default)]
    config: bool,
    #[serde(default)]
    kind: Option<String>,
}

/// `DELETE .../devices/{key}`: key is a disk target, a MAC address or an alias.
async fn detach_key(
    State(m): M,
    Path((name, key)): Path<(String, String)>,
    Query(q): Query<DetachQuery>,
) -> R<Empty> {
    let r = DetachRequest {
        xml: None,
        key: Some(key),
        kind: q.kind,
        scope: PinScope {
            live: q.live,
            config: q.config,
        },
    };
    m.detach_device(&name, &r).await?;
    ok()
}

async fn domstats(State(m): M, Path(name): Path<String>) -> R<DomainStats> {
    Ok(Json(m.domain_stats(&name).await?))
}

async fn monitor(
    State(m): M,
    Path(name): Path<String>,
    Json(r): Json<MonitorRequest>,
) -> R<MonitorReply> {
    Ok(Json(m.monitor(&name, &r).await?))
}

async fn pins(State(m): M, Path(name): Path<String>) -> R<PinInfo> {
    Ok(Json(m.pin_info(&name).await?))
}

async fn vcpupin(State(m): M, Path(name): Path<String>, Json(r): Json<VcpuPinRequest>) -> R<Empty> {
    m.vcpupin(&name, r.vcpu, &r.cpuset, r.scope).await?;
    ok()
}

async fn emulatorpin(
    State(m): M,
    Path(name): Path<String>,
    Json(r): Json<EmulatorPinRequest>,
) -> R<Empty> {
    m.emulatorpin(&name, &r.cpuset, r.scope).await?;
    ok()
}

#[derive(Deserialize)]
struct ConsoleQuery {
    #[serde(default)]
    force: bool,
}

/// Upgrades the connection to a raw byte stream joined to the VMM's serial socket. One session
/// per domain; `force` ends the existing one.
async fn console(
    State(m): M,
    Path(name): Path<String>,
    Query(q): Query<ConsoleQuery>,
    mut req: Request,
) -> Result<Response, ApiError> {
    let (_, slot) = m.find(&name)?;
    let serial = {
        let st = slot.lock();
        match &st.run {
            Some(r) if st.state.is_active() => r.serial_socket.clone(),
            _ => return Err(ApiError::not_running()),
        }
    };
    let wants_upgrade = req.headers().get(header::UPGRADE).is_some_and(|v| {
        v.as_bytes()
            .eq_ignore_ascii_case(CONSOLE_UPGRADE.as_bytes())
    });
    if !wants_upgrade {
        return Err(ApiError::invalid_arg(format!(
            "the console needs 'Connection: Upgrade' and 'Upgrade: {CONSOLE_UPGRADE}'"
        )));
    }
    let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel();
    {
        let mut cur = slot.console.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(prev) = cur.take() {
            if !prev.is_closed() && !q.force {
                *cur = Some(prev);
                return Err(ApiError::failed(
                    "Active console session exists for this domain",
                ));
            }
            let _ = prev.send(());
        }
        *cur = Some(cancel_tx);
    }
    let stream = tokio::net::UnixStream::connect(&serial)
        .await
        .map_err(|e| {
            ApiError::failed(format!(
                "cannot open the serial console {}: {e}",
                serial.display()
            ))
        })?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        relay(hyper_util::rt::TokioIo::new(upgraded), stream, cancel_rx).await;
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, CONSOLE_UPGRADE)
        .body(axum::body::Body::empty())
        .expect("static response"))
}

/// Copies both ways between the client and the serial socket. The directions are independent so
/// that input the client sent just before closing still reaches the guest; when one side ends,
/// the other gets a short grace period to drain.
async fn relay(
    client: impl tokio::io::AsyncRead + tokio::io::AsyncWrite,
    serial: tokio::net::UnixStream,
    cancel: tokio::sync::oneshot::Receiver<()>,
) {
    use tokio::io::AsyncWriteExt;
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut sr, mut sw) = serial.into_split();
    let up = async move {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
        let _ = sw.shutdown().await;
    };
    let down = async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
    };
    tokio::pin!(up, down);
    tokio::select! {
        _ = &mut up => {
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut down).await;
        }
        _ = &mut down => {
            let _ = tokio::time::timeout(Duration::from_millis(500), &mut up).await;
        }
        _ = cancel => {}
    }
}

async fn domifaddr(State(m): M, Path(name): Path<String>) -> R<Vec<IfAddr>> {
    Ok(Json(m.domifaddr(&name).await?))
}

async fn net_list(State(m): M) -> R<Vec<NetworkSummary>> {
    Ok(Json(m.net_list().await?))
}

async fn net_define(State(m): M, Json(req): Json<NetDefineRequest>) -> R<NetDefineResponse> {
    Ok(Json(m.net_define(req.xml).await?))
}

async fn net_info(State(m): M, Path(name): Path<String>) -> R<NetworkSummary> {
    Ok(Json(m.net_info(&name).await?))
}

async fn net_undefine(State(m): M, Path(name): Path<String>) -> R<Empty> {
    m.net_undefine(&name).await?;
    ok()
}

async fn net_xml(State(m): M, Path(name): Path<String>) -> R<XmlBody> {
    Ok(Json(XmlBody {
        xml: m.net_xml(&name).await?,
    }))
}

async fn net_start(State(m): M, Path(name): Path<String>) -> R<Empty> {
    m.net_start(&name).await?;
    ok()
}

#[derive(Deserialize)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

async fn net_destroy(
    State(m): M,
    Path(name): Path<String>,
    Query(q): Query<ForceQuery>,
) -> R<Empty> {
    m.net_destroy(&name, q.force).await?;
    ok()
}

async fn net_autostart(
    State(m): M,
    Path(name): Path<String>,
    Json(req): Json<AutostartRequest>,
) -> R<Empty> {
    m.net_set_autostart(&name, req.enable).await?;
    ok()
}

async fn net_leases(State(m): M, Path(name): Path<String>) -> R<Vec<NetDhcpLease>> {
    Ok(Json(m.net_dhcp_leases(&name).await?))
}

async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
}
