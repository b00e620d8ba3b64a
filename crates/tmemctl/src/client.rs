//! A tiny synchronous HTTP/1.1 client over the daemon's Unix control socket.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tmem_api::ErrorBody;

/// Largest response accepted, bytes.
pub const MAX_RESPONSE: usize = 64 << 20;

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("Cannot connect to tmemd at {0} (is it running? see --state-dir)")]
    Connect(PathBuf, #[source] io::Error),
    /// Sending or receiving failed.
    #[error("Connection to tmemd failed")]
    Io(#[source] io::Error),
    /// The reply is not valid HTTP or JSON.
    #[error("Invalid reply from tmemd: {0}")]
    BadReply(String),
    /// The daemon answered with an error.
    #[error("tmemd refused the request (HTTP {status})")]
    Server {
        /// HTTP status.
        status: u16,
        /// The daemon's error and chain.
        body: ErrorBody,
    },
}

/// A connection target.
#[derive(Debug, Clone)]
pub struct Client {
    sock: PathBuf,
}

impl Client {
    /// A client for the control socket at `sock`.
    pub fn new(sock: impl Into<PathBuf>) -> Self {
        Client { sock: sock.into() }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.sock
    }

    /// Sends a request; returns status and body.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let s = UnixStream::connect(&self.sock)
            .map_err(|e| ClientError::Connect(self.sock.clone(), e))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(ClientError::Io)?;
        let mut w = &s;
        let body = body.unwrap_or(&[]);
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json\r\n"
        );
        if !body.is_empty() || method != "GET" {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        w.write_all(req.as_bytes()).map_err(ClientError::Io)?;
        w.write_all(body).map_err(ClientError::Io)?;
        w.flush().map_err(ClientError::Io)?;
        read_response(&mut BufReader::new(&s))
    }

    /// Sends a request with an optional JSON body and decodes a JSON reply (`()` for 204).
    pub fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let bytes = match body {
            Some(b) => {
                Some(serde_json::to_vec(b).map_err(|e| ClientError::BadReply(e.to_string()))?)
            }
            None => None,
        };
        let (status, reply) = self.raw(method, path, bytes.as_deref())?;
        if !(200..300).contains(&status) {
            let body = serde_json::from_slice::<ErrorBody>(&reply).unwrap_or_else(|_| ErrorBody {
                error: String::from_utf8_lossy(&reply).trim().to_owned(),
                chain: Vec::new(),
            });
            return Err(ClientError::Server { status, body });
        }
        let reply = if reply.is_empty() {
            b"null".to_vec()
        } else {
            reply
        };
        serde_json::from_slice(&reply).map_err(|e| ClientError::BadReply(e.to_string()))
    }

    /// `GET` a versioned resource.
    pub fn get<T: DeserializeOwned>(&self, resource: &str) -> Result<T, ClientError> {
        self.call::<(), T>("GET", &format!("{}{resource}", tmem_api::API_PREFIX), None)
    }
}

fn read_response<R: BufRead>(r: &mut R) -> Result<(u16, Vec<u8>), ClientError> {
    let bad = |m: &str| ClientError::BadReply(m.to_owned());
    let mut status: Option<u16> = None;
    let mut len: Option<usize> = None;
    loop {
        let mut line = String::new();
        let n = r
            .by_ref()
            .take(16 << 10)
            .read_line(&mut line)
            .map_err(ClientError::Io)?;
        if n == 0 {
            return Err(bad("connection closed before the reply head ended"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            match status {
                Some(100) => {
                    status = None;
                    continue;
                }
                Some(_) => break,
                None => continue,
            }
        }
        match status {
            None => {
                let code = l
                    .strip_prefix("HTTP/1.")
                    .and_then(|s| s.get(2..5))
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| bad("malformed status line"))?;
                status = Some(code);
            }
            Some(_) => {
                if let Some((k, v)) = l.split_once(':') {
                    if k.trim().eq_ignore_ascii_case("content-length") {
                        len = Some(v.trim().parse().map_err(|_| bad("bad Content-Length"))?);
                    }
                }
            }
        }
    }
    let status = status.ok_or_else(|| bad("no status"))?;
    let mut body = Vec::new();
    match len {
        Some(n) if n > MAX_RESPONSE => return Err(bad("reply too large")),
        Some(n) => {
            body.resize(n, 0);
            r.read_exact(&mut body).map_err(ClientError::Io)?;
        }
        None => {
            r.take(MAX_RESPONSE as u64)
                .read_to_end(&mut body)
                .map_err(ClientError::Io)?;
        }
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies() {
        let mut r =
            io::Cursor::new(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}".to_vec());
        assert_eq!(read_response(&mut r).unwrap(), (404, b"{}".to_vec()));
        let mut r = io::Cursor::new(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec());
        assert_eq!(read_response(&mut r).unwrap(), (204, Vec::new()));
        for bad in [
            &b""[..],
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        ] {
            assert!(read_response(&mut io::Cursor::new(bad.to_vec())).is_err());
        }
    }
}
