//! A small blocking HTTP/1.1 client for rvirtd's unix socket. One request per connection
//! (`Connection: close`): the CLI makes a handful of calls per run, and staying synchronous keeps
//! its start-up time (which `rvirt list` is measured on) free of an async runtime.

use rvirt_api::rest::{ErrorBody, ErrorCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

pub const DEFAULT_SOCKET: &str = "/run/rvirt/rvirtd.sock";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("failed to connect to rvirtd at {path}: {source}; is rvirtd running? (-c/--connect or RVIRT_SOCKET choose the socket)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lost the connection to rvirtd: {0}")]
    Io(#[from] std::io::Error),
    #[error("rvirtd sent a malformed answer: {0}")]
    Protocol(String),
    /// The daemon refused or failed the request.
    #[error("{}", .0.error)]
    Api(ErrorBody),
}

impl ClientError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api(b) => Some(b.code),
            _ => None,
        }
    }
}

pub struct Client {
    socket: PathBuf,
}

/// A response head read from the socket; the rest of the stream follows.
pub struct Head {
    pub status: u16,
    pub content_length: Option<usize>,
    pub chunked: bool,
}

pub fn read_head(r: &mut impl BufRead) -> Result<Head, ClientError> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("bad status line '{}'", line.trim())))?;
    let (mut content_length, mut chunked) = (None, false);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                content_length = v.parse().ok();
            } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    Ok(Head {
        status,
        content_length,
        chunked,
    })
}

fn read_body(r: &mut impl BufRead, head: &Head) -> Result<Vec<u8>, ClientError> {
    let mut body = Vec::new();
    if head.chunked {
        let mut line = String::new();
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| ClientError::Protocol("bad chunk size".into()))?;
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = head.content_length {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(body)
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_path_buf(),
        }
    }

    pub fn connect(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
            path: self.socket.clone(),
            source,
        })
    }

    /// Sends a request; a 2xx answer is decoded as `T`, anything else becomes
    /// [`ClientError::Api`].
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let mut stream = self.connect()?;
        let payload = body
            .map(|b| serde_json::to_vec(b).expect("request bodies serialize"))
            .unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json\r\n"
        );
        if body.is_some() {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                payload.len()
            ));
        }
        req.push_str("\r\n");
        let mut msg = req.into_bytes();
        msg.extend_from_slice(&payload);
        // The daemon may answer (and close) before reading a body it does not need, e.g. when
        // the domain is not running: a failed write is fine as long as an answer can be read.
        let written = stream.write_all(&msg);
        let mut r = BufReader::new(stream);
        let head = match (read_head(&mut r), written) {
            (Ok(h), _) => h,
            (Err(_), Err(e)) => return Err(e.into()),
            (Err(e), Ok(())) => return Err(e),
        };
        let body = read_body(&mut r, &head)?;
        if (200..300).contains(&head.status) {
            serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))
        } else {
            let err: ErrorBody = serde_json::from_slice(&body).unwrap_or_else(|_| ErrorBody {
                error: format!(
                    "rvirtd answered HTTP {}: {}",
                    head.status,
                    String::from_utf8_lossy(&body).trim()
                ),
                code: ErrorCode::Internal,
            });
            Err(ClientError::Api(err))
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call("GET", path, None::<&()>)
    }

    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        self.call("POST", path, Some(body))
    }
}

/// Percent-encodes a domain name or UUID for a URL path segment.
pub fn seg(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~+".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn reads_content_length_and_chunked_bodies() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        let mut r = Cursor::new(&raw[..]);
        let head = read_head(&mut r).unwrap();
        assert_eq!(
            (head.status, head.content_length, head.chunked),
            (200, Some(5), false)
        );
        assert_eq!(read_body(&mut r, &head).unwrap(), b"hello");

        let raw = b"HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let mut r = Cursor::new(&raw[..]);
        let head = read_head(&mut r).unwrap();
        assert_eq!((head.status, head.chunked), (409, true));
        assert_eq!(read_body(&mut r, &head).unwrap(), b"abcde");
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        let mut r = Cursor::new(&b"garbage\r\n\r\n"[..]);
        assert!(matches!(read_head(&mut r), Err(ClientError::Protocol(_))));
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        let mut r = Cursor::new(&raw[..]);
        let head = read_head(&mut r).unwrap();
        assert!(read_body(&mut r, &head).is_err());
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(seg("web-01.x_y+z"), "web-01.x_y+z");
        assert_eq!(seg("a b/c"), "a%20b%2Fc");
    }
}
