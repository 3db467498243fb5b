//! The control socket (`--api-socket`): JSON lines as defined in `rvirt_api::vmm`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread;

use anyhow::{Context, Result};
use rvirt_api::vmm::{ExitReason, Request, Response, VcpuThread};

use crate::vm::Shared;

/// Listen on `path` and serve requests on a thread per connection.
pub fn start(path: &Path, shared: Arc<Shared>) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).with_context(|| {
        format!(
            "--api-socket {}: cannot listen; check the directory exists and is writable",
            path.display()
        )
    })?;
    thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for s in l.incoming().flatten() {
                let sh = shared.clone();
                let _ = thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || serve(s, sh));
            }
        })
        .context("spawning the control socket thread")?;
    Ok(())
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
        },
        Request::Pause => {
            if sh.pause() {
                Response::Ok
            } else {
                Response::Error {
                    message: "not every vCPU stopped within 2 s; try again".into(),
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
        },
        Request::Watch => Response::Ok,
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
