//! The control socket (`--api-socket`): JSON lines as defined in `rvirt_api::vmm`.

use std::io::{BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use anyhow::{Context, Result};
use rvirt_api::vmm::{ExitReason, Request, Response, VcpuThread};

use crate::vm::Shared;

/// Open client connections: a handle on each stream (to shut it down) and its thread.
type Connections = Arc<Mutex<Vec<(UnixStream, thread::JoinHandle<()>)>>>;

/// The running control socket; [`ControlServer::stop`] ends it.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
    conns: Connections,
    shared: Arc<Shared>,
}

/// Listen on `path` and serve requests on a thread per connection.
pub fn start(path: &Path, shared: Arc<Shared>) -> Result<ControlServer> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).with_context(|| {
        format!(
            "--api-socket {}: cannot listen; check the directory exists and is writable",
            path.display()
        )
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let conns: Connections = Arc::default();
    let (st, cs, sh) = (stop.clone(), conns.clone(), shared.clone());
    let accept = thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for s in l.incoming().flatten() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(keep) = s.try_clone() else { continue };
                let sh = sh.clone();
                if let Ok(h) = thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || serve(s, sh))
                {
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
        shared,
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
        for w in self
            .shared
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = w.shutdown(Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(4096) as u64
}

fn cpu_time_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Answer one request (Watch is handled by the caller).
pub fn answer(req: &Request, sh: &Shared) -> Response {
    match req {
        Request::Info => Response::Info {
            pid: std::process::id(),
            name: sh.name.clone(),
            state: sh.run_state(),
            vcpus: sh.vcpus,
            memory_bytes: sh.memory,
            max_vcpus: sh.vcpus,
        },
        Request::Pause => {
            if sh.pause() {
                Response::Ok
            } else {
                Response::Error {
                    message: "not every vCPU and device worker stopped within 2 s; try again"
                        .into(),
                }
            }
        }
        Request::Resume => {
            sh.resume();
            Response::Ok
        }
        Request::PowerButton => {
            if let Some(l) = sh.legacy.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                l.power_button();
            }
            Response::Ok
        }
        // `serve` answers before stopping the VM, so the client gets its reply.
        Request::Quit => Response::Ok,
        Request::VcpuInfo => {
            let state = sh.run_state();
            let vcpus = sh
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .enumerate()
                .map(|(i, (tid, _))| VcpuThread {
                    vcpu: i as u32,
                    tid: *tid,
                    state,
                })
                .collect();
            Response::VcpuInfo { vcpus }
        }
        Request::Stats => Response::Stats {
            rss_bytes: rss_bytes(),
            cpu_time_ns: cpu_time_ns(),
            devices: Vec::new(),
        },
        Request::Watch => Response::Ok,
        other => Response::Error {
            message: format!("{other:?} is not supported by this rvirt-vmm yet"),
        },
    }
}

fn serve(s: UnixStream, sh: Arc<Shared>) {
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
                    sh.watchers.lock().unwrap_or_else(|e| e.into_inner()).push(c);
                }
                return;
            }
            Ok(req) => answer(req, &sh),
            Err(e) => Response::Error {
                message: format!("bad request ({e}); send one JSON object per line, e.g. {{\"request\":\"info\"}}"),
            },
        };
        let mut out = serde_json::to_string(&resp).unwrap_or_else(|_| "{}".into());
        out.push('\n');
        let sent = w.write_all(out.as_bytes()).is_ok();
        if matches!(req, Ok(Request::Quit)) {
            sh.request_exit(ExitReason::Quit);
        }
        if !sent {
            return;
        }
    }
}
