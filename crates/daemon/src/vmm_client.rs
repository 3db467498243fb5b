//! Client side of the rvirt-vmm control socket (see `rvirt_api::vmm`).

use rvirt_api::vmm::{Event, Request, Response};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;

/// How long one request may take before the VMM is considered unresponsive.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum VmmClientError {
    #[error("cannot reach the VMM control socket {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VMM control socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the VMM did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the VMM closed the control connection without answering")]
    Closed,
    #[error("the VMM sent an unreadable answer '{line}': {source}")]
    Protocol {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the VMM refused: {0}")]
    Refused(String),
}

async fn connect(path: &Path) -> Result<UnixStream, VmmClientError> {
    UnixStream::connect(path)
        .await
        .map_err(|source| VmmClientError::Connect {
            path: path.display().to_string(),
            source,
        })
}

async fn send(stream: &mut UnixStream, req: &Request) -> Result<(), VmmClientError> {
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).await?;
    Ok(())
}

/// Sends one request on a fresh connection and returns the answer; `Response::Error` becomes
/// [`VmmClientError::Refused`].
pub async fn request(path: &Path, req: &Request) -> Result<Response, VmmClientError> {
    let fut = async {
        let mut stream = connect(path).await?;
        send(&mut stream, req).await?;
        let mut lines = BufReader::new(stream).lines();
        let line = lines.next_line().await?.ok_or(VmmClientError::Closed)?;
        let resp: Response =
            serde_json::from_str(&line).map_err(|source| VmmClientError::Protocol {
                line: line.clone(),
                source,
            })?;
        match resp {
            Response::Error { message } => Err(VmmClientError::Refused(message)),
            other => Ok(other),
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, fut)
        .await
        .map_err(|_| VmmClientError::Timeout(REQUEST_TIMEOUT))?
}

/// An event stream from [`Request::Watch`].
pub struct Watch {
    lines: Lines<BufReader<OwnedReadHalf>>,
    // Kept so the connection stays open in both directions.
    _write: tokio::net::unix::OwnedWriteHalf,
}

impl Watch {
    pub async fn open(path: &Path) -> Result<Watch, VmmClientError> {
        let mut stream = connect(path).await?;
        send(&mut stream, &Request::Watch).await?;
        let (read, write) = stream.into_split();
        Ok(Watch {
            lines: BufReader::new(read).lines(),
            _write: write,
        })
    }

    /// The next event; `None` when the connection closed (the VMM is gone). Lines that are not
    /// events (e.g. an `ok` answer to the watch request) are skipped.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            let line = self.lines.next_line().await.ok()??;
            if let Ok(ev) = serde_json::from_str::<Event>(&line) {
                return Some(ev);
            }
        }
    }
}
