//! Binding the API socket and serving it.

use crate::manager::{Config, Manager};
use anyhow::{bail, Context};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Options {
    pub config: Config,
    pub socket: PathBuf,
    /// Octal permission bits of the socket.
    pub socket_mode: u32,
}

/// Binds `path` with the given mode. A socket file left by a dead daemon is replaced; one that a
/// live daemon still answers on is an error.
pub fn bind(path: &Path, mode: u32) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create socket directory {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another rvirtd is already listening on {}; stop it or use --socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    // Create the socket with no group/other access from the first instant, then set the mode.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = tokio::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set mode {mode:o} on {}", path.display()))?;
    Ok(listener)
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    // Bind first: it refuses when another daemon is live, and two daemons must never supervise
    // the same VMMs.
    let listener = bind(&opts.socket, opts.socket_mode)?;
    let mgr = Manager::new(opts.config.clone())?;
    crate::networks::startup(&mgr.net).await;
    mgr.reattach().await;
    tracing::info!(
        "rvirtd listening on {} (state {}, run {}, vmm {})",
        opts.socket.display(),
        opts.config.state_dir.display(),
        opts.config.run_dir.display(),
        opts.config.vmm_binary.display()
    );
    let auto: Arc<Manager> = mgr.clone();
    tokio::spawn(async move { auto.autostart().await });
    let app = crate::http::router(mgr);
    let socket = opts.socket.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("rvirtd stopping; running domains keep running and are re-attached on the next start");
        })
        .await
        .context("serving the API")?;
    let _ = std::fs::remove_file(socket);
    Ok(())
}
