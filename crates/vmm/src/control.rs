//! The control socket (`--api-socket`): JSON lines as defined in `rvirt_api::vmm`. An adapter
//! only: each line becomes a typed [`VmmMessage`] for the VMM thread, whose answer goes back as
//! one line; a `watch` connection is handed to the VMM thread, which writes events to it.

use std::io::{BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use anyhow::{Context, Result};
use rvirt_api::vmm::{ExitReason, Request, Response};

use crate::messages::{Mailbox, VmmMessage};
use crate::threads;

/// Open client connections: a handle on each stream (to shut it down) and its thread.
type Connections = Arc<Mutex<Vec<(UnixStream, thread::JoinHandle<()>)>>>;

/// The running control socket; [`ControlServer::stop`] ends it.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
    conns: Connections,
}

/// Listen on `path` and serve requests on a thread per connection.
pub fn start(path: &Path, mailbox: Mailbox) -> Result<ControlServer> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).with_context(|| {
        format!(
            "--api-socket {}: cannot listen; check the directory exists and is writable",
            path.display()
        )
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let conns: Connections = Arc::default();
    let (st, cs) = (stop.clone(), conns.clone());
    let accept = threads::spawn("api", move || {
        for s in l.incoming().flatten() {
            if st.load(Ordering::SeqCst) {
                return;
            }
            let Ok(keep) = s.try_clone() else { continue };
            let m = mailbox.clone();
            if let Ok(h) = threads::spawn("api-conn", move || serve(s, m)) {
                let mut c = cs.lock().unwrap_or_else(|e| e.into_inner());
                // Forget connections that already ended.
                c.retain(|(_, h)| !h.is_finished());
                c.push((keep, h));
            }
        }
    })
    .context("spawning the control socket thread")?;
    Ok(ControlServer {
        path: path.to_path_buf(),
        stop,
        accept: Some(accept),
        conns,
    })
}

impl ControlServer {
    /// Stop accepting, close every connection (watchers see end of file after their last
    /// event), join the threads and remove the socket file.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop with a connection of our own.
        let _ = UnixStream::connect(&self.path);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for (s, _) in &conns {
            let _ = s.shutdown(Shutdown::Both);
        }
        for (_, h) in conns {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(s: UnixStream, mailbox: Mailbox) {
    let Ok(mut w) = s.try_clone() else { return };
    let r = BufReader::new(s);
    for line in r.lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let req = serde_json::from_str::<Request>(&line);
        let resp = match &req {
            Ok(Request::Watch) => {
                if let Ok(c) = w.try_clone() {
                    mailbox.send(VmmMessage::Watch(c));
                }
                return;
            }
            // Answered here, before the VMM starts stopping, so the client gets its reply.
            Ok(Request::Quit) => Response::Ok,
            Ok(req) => match mailbox.call(req.clone()) {
                Some(r) => r,
                None => return,
            },
            Err(e) => Response::Error {
                message: format!("bad request ({e}); send one JSON object per line, e.g. {{\"request\":\"info\"}}"),
            },
        };
        let mut out = serde_json::to_string(&resp).unwrap_or_else(|_| "{}".into());
        out.push('\n');
        let sent = w.write_all(out.as_bytes()).is_ok();
        if matches!(req, Ok(Request::Quit)) {
            mailbox.exit(ExitReason::Quit);
        }
        if !sent {
            return;
        }
    }
}
