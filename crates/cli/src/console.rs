//! `rvirt console`: the domain's serial console through rvirtd, in raw terminal mode; Ctrl+]
//! detaches, as in virsh.

use crate::client::{read_head, seg, Client, ClientError};
use rvirt_api::rest::{ErrorBody, CONSOLE_UPGRADE};
use std::io::{BufReader, Read, Write};
use std::net::Shutdown;

/// Ctrl+] — virsh's default escape character.
pub const ESCAPE: u8 = 0x1d;

/// Puts stdin in raw mode while alive (when it is a terminal) and restores it on drop.
struct RawMode(Option<libc::termios>);

impl RawMode {
    fn enter() -> RawMode {
        // SAFETY: termios is plain data; tcgetattr fills it or fails on a non-terminal.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 and a valid termios pointer.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return RawMode(None);
        }
        let saved = t;
        // SAFETY: cfmakeraw only edits the struct we own.
        unsafe { libc::cfmakeraw(&mut t) };
        // SAFETY: fd 0 and a valid termios.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restores the settings read in `enter`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

/// Attaches to `domain`'s console until the escape key, end of input, or the VM stops.
pub fn attach(client: &Client, domain: &str, force: bool) -> Result<(), ClientError> {
    let mut stream = client.connect()?;
    let path = format!(
        "/v1/domains/{}/console{}",
        seg(domain),
        if force { "?force=true" } else { "" }
    );
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: {CONSOLE_UPGRADE}\r\n\r\n"
    )?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let head = read_head(&mut reader)?;
    if head.status != 101 {
        let mut body = vec![0; head.content_length.unwrap_or(0)];
        reader.read_exact(&mut body)?;
        let err: ErrorBody = serde_json::from_slice(&body).map_err(|_| {
            ClientError::Protocol(format!("console refused with HTTP {}", head.status))
        })?;
        return Err(ClientError::Api(err));
    }
    println!("Connected to domain '{domain}'");
    println!("Escape character is ^] (Ctrl + ])");
    let raw = RawMode::enter();
    let mut to_vm = stream.try_clone()?;
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    // End of input (not a detach): stop sending; rvirtd relays what the guest
                    // still prints for a 2 s grace period, then closes the session.
                    let _ = to_vm.shutdown(Shutdown::Write);
                    return;
                }
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            let (data, detach) = match chunk.iter().position(|&b| b == ESCAPE) {
                Some(i) => (&chunk[..i], true),
                None => (chunk, false),
            };
            if to_vm.write_all(data).is_err() || detach {
                break;
            }
        }
        let _ = to_vm.shutdown(Shutdown::Both);
    });
    let mut stdout = std::io::stdout();
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let _ = stdout.write_all(&buf[..n]);
                let _ = stdout.flush();
            }
        }
    }
    drop(raw);
    println!();
    Ok(())
}
