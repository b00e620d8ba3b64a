//! The control API: FC-style resources under `/api/v1` (one `match` routes them), errors as
//! `{"error", "chain"}` with HTTP codes chosen by an exhaustive match, and `/metrics`.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tmem_api::{
    CompactRequest, CreateClient, CreateExport, CreateGuest, ErrorBody, SetBudget, ShrinkRequest,
    UpgradeRequest, API_PREFIX,
};

use crate::balloon::GuestError;
use crate::daemon::{Daemon, OpError};
use crate::http::{Handler, Request, Response};
use crate::ratelimit::RateLimit;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No such resource.
    #[error("No resource at {0}")]
    NotFound(String),
    /// The resource does not take this method.
    #[error("Method {0} not allowed on {1}")]
    MethodNotAllowed(String, String),
    /// The body is not the expected JSON.
    #[error("Invalid JSON body")]
    BadJson(#[source] serde_json::Error),
    /// A path parameter is invalid.
    #[error("Invalid path parameter {0:?}")]
    BadParam(String),
    /// The operation failed.
    #[error("{0} failed")]
    Op(&'static str, #[source] Box<OpError>),
}

impl ApiError {
    /// The HTTP status. Exhaustive on purpose (no `_` arm): a new variant must pick one.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed(..) => 405,
            ApiError::BadJson(_) | ApiError::BadParam(_) => 400,
            ApiError::Op(_, e) => op_status(e),
        }
    }
}

fn op_status(e: &OpError) -> u16 {
    match e {
        OpError::Invalid(_) | OpError::Option(_) => 400,
        OpError::UnknownClient(_) | OpError::UnknownExport(_) => 404,
        OpError::NotCached(_)
        | OpError::ClientExists(_)
        | OpError::ExportExists(_)
        | OpError::ClientBusy(..)
        | OpError::ExportBusy(..) => 409,
        OpError::Engine(e) => engine_status(e),
        OpError::Export(_, e) => export_status(e),
        OpError::Guest(e) => match e {
            GuestError::Exists(_) => 409,
            GuestError::Unknown(_) => 404,
            GuestError::BadName(_) | GuestError::Bounds(..) | GuestError::Target => 400,
            GuestError::Qmp(..) | GuestError::Libvirt(..) | GuestError::Agent(..) => 502,
            GuestError::Thread(_) => 500,
        },
        OpError::ShuttingDown => 503,
    }
}

fn engine_status(e: &tmem_core::Error) -> u16 {
    use tmem_core::Error as E;
    match e {
        E::UnknownClient(_) | E::UnknownPool(_) => 404,
        E::ClientExists(_) | E::SpecMismatch(_) => 409,
        E::AccessDenied { .. } | E::NotAuthorized { .. } | E::Frozen(_) => 403,
        E::Unsupported(_) | E::BadLength(_) => 400,
        E::QuotaExceeded(_) | E::NoSpace | E::TooManyPools => 507,
        E::Stream(_) => 500,
    }
}

fn export_status(e: &tmem_exports::ExportError) -> u16 {
    use tmem_exports::ExportError as X;
    match e {
        X::TooLarge { .. } | X::InvalidConfig(_) => 400,
        X::CreatePool(e) | X::JoinPool(e) | X::Engine(e) | X::ReleasePool(e) => engine_status(e),
        X::LookupPool { source, .. } => engine_status(source),
        X::AttachPool { .. } => 409,
        X::ImageOpen { source, .. } | X::SpillOpen { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => 404,
            std::io::ErrorKind::PermissionDenied => 403,
            _ => 500,
        },
        X::SpillIo(_) | X::ImageIo(_) | X::SpillRemove { .. } | X::PageMap { .. } => 500,
        X::SpillSpace { .. } => 507,
        X::Poisoned { .. } => 500,
        X::Remote(_) => 503,
        X::Closed | X::ReadOnly => 409,
    }
}

/// The control API handler.
#[derive(Debug)]
pub struct Api {
    d: Arc<Daemon>,
}

static REQ_ERRORS: RateLimit = RateLimit::new();

fn json<T: Serialize>(status: u16, v: &T) -> Response {
    match serde_json::to_vec_pretty(v) {
        Ok(mut b) => {
            b.push(b'\n');
            Response::json(status, b)
        }
        Err(e) => error_response(500, &e),
    }
}

fn error_response(status: u16, e: &dyn std::error::Error) -> Response {
    let body = ErrorBody::from_error(e);
    let mut b = serde_json::to_vec(&body)
        .unwrap_or_else(|_| b"{\"error\":\"internal\",\"chain\":[]}".to_vec());
    b.push(b'\n');
    Response::json(status, b)
}

fn body<T: DeserializeOwned>(req: &Request) -> Result<T, ApiError> {
    serde_json::from_slice(&req.body).map_err(ApiError::BadJson)
}

fn op<T: Serialize>(
    what: &'static str,
    status: u16,
    r: Result<T, OpError>,
) -> Result<Response, ApiError> {
    r.map(|v| json(status, &v))
        .map_err(|e| ApiError::Op(what, Box::new(e)))
}

fn op_empty(what: &'static str, r: Result<(), OpError>) -> Result<Response, ApiError> {
    r.map(|()| Response::empty(204))
        .map_err(|e| ApiError::Op(what, Box::new(e)))
}

fn client_id(s: &str) -> Result<u32, ApiError> {
    s.parse().map_err(|_| ApiError::BadParam(s.to_owned()))
}

impl Api {
    /// A handler over the daemon.
    pub fn new(d: Arc<Daemon>) -> Self {
        Api { d }
    }

    /// Routes one request.
    pub fn route(&self, req: &Request) -> Result<Response, ApiError> {
        let m = req.method.as_str();
        let path = req.path.trim_end_matches('/');
        if path == "/metrics" {
            return match m {
                "GET" => Ok(self.metrics()),
                _ => Err(ApiError::MethodNotAllowed(m.into(), path.into())),
            };
        }
        let Some(rest) = path.strip_prefix(API_PREFIX) else {
            return Err(ApiError::NotFound(req.path.clone()));
        };
        let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let d = &self.d;
        match (m, segs.as_slice()) {
            ("GET", ["status"]) => Ok(json(200, &d.status())),
            ("GET", ["stats"]) => Ok(json(200, &d.stats())),
            ("GET", ["clients"]) => Ok(json(200, &d.clients())),
            ("POST", ["clients"]) => op(
                "Create client",
                201,
                d.create_client(&body::<CreateClient>(req)?),
            ),
            ("DELETE", ["clients", id]) => {
                op_empty("Delete client", d.delete_client(client_id(id)?))
            }
            ("POST", ["clients", id, "freeze"]) => {
                op("Freeze client", 200, d.freeze_client(client_id(id)?, true))
            }
            ("POST", ["clients", id, "thaw"]) => {
                op("Thaw client", 200, d.freeze_client(client_id(id)?, false))
            }
            ("GET", ["exports"]) => Ok(json(200, &d.exports())),
            ("GET", ["exports", name]) => op("Get export", 200, d.export(name)),
            ("POST", ["exports"]) => op(
                "Create export",
                201,
                d.create_export(&body::<CreateExport>(req)?),
            ),
            ("DELETE", ["exports", name]) => {
                let force = req
                    .query
                    .as_deref()
                    .is_some_and(|q| q.split('&').any(|kv| kv == "force=true" || kv == "force=1"));
                op_empty("Delete export", d.delete_export(name, force))
            }
            ("POST", ["exports", name, "invalidate"]) => {
                op("Invalidate export", 200, d.invalidate_export(name))
            }
            ("PUT", ["budget"]) => op(
                "Set budget",
                200,
                d.set_budget(body::<SetBudget>(req)?.bytes.0),
            ),
            ("POST", ["shrink"]) => {
                op("Shrink", 200, d.shrink(body::<ShrinkRequest>(req)?.bytes.0))
            }
            ("POST", ["compact"]) => {
                let r: CompactRequest = if req.body.iter().all(u8::is_ascii_whitespace) {
                    CompactRequest::default()
                } else {
                    body(req)?
                };
                op("Compact", 200, d.compact(r.max_moves))
            }
            ("POST", ["upgrade"]) => {
                let r: UpgradeRequest = if req.body.iter().all(u8::is_ascii_whitespace) {
                    UpgradeRequest::default()
                } else {
                    body(req)?
                };
                op("Upgrade", 202, d.upgrade(r.binary))
            }
            ("GET", ["guests"]) => Ok(json(200, &d.guests())),
            ("POST", ["guests"]) => op("Add guest", 201, d.add_guest(&body::<CreateGuest>(req)?)),
            ("DELETE", ["guests", name]) => op_empty("Remove guest", d.remove_guest(name)),
            (_, s) if known(s) => Err(ApiError::MethodNotAllowed(m.into(), req.path.clone())),
            _ => Err(ApiError::NotFound(req.path.clone())),
        }
    }

    fn metrics(&self) -> Response {
        Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: crate::metrics::render(&self.d.stats()).into_bytes(),
        }
    }
}

fn known(segs: &[&str]) -> bool {
    matches!(
        segs,
        ["status"]
            | ["stats"]
            | ["clients"]
            | ["clients", _]
            | ["clients", _, "freeze" | "thaw"]
            | ["exports"]
            | ["exports", _]
            | ["exports", _, "invalidate"]
            | ["budget"]
            | ["shrink"]
            | ["compact"]
            | ["upgrade"]
            | ["guests"]
            | ["guests", _]
    )
}

impl Handler for Api {
    fn handle(&self, req: &Request) -> Response {
        match self.route(req) {
            Ok(r) => r,
            Err(e) => {
                let status = e.status();
                if REQ_ERRORS.allow() {
                    let c = ErrorBody::from_error(&e).chain.join(": ");
                    if status >= 500 {
                        tracing::warn!(method = %req.method, path = %req.path, status, error = %c, "request failed");
                    } else {
                        tracing::debug!(method = %req.method, path = %req.path, status, error = %c, "request refused");
                    }
                }
                error_response(status, &e)
            }
        }
    }

    fn reject(&self, status: u16, message: &str) -> Response {
        #[derive(Debug, thiserror::Error)]
        #[error("Malformed HTTP request: {0}")]
        struct Malformed(String);
        error_response(status, &Malformed(message.to_owned()))
    }
}

/// Serves only `GET /metrics` (the TCP metrics listener).
#[derive(Debug)]
pub struct MetricsOnly(pub Arc<Api>);

/// The handlers the daemon serves: the whole API on the control socket, `/metrics` alone
/// on the TCP listener.
pub fn handlers(d: &Arc<Daemon>) -> crate::daemon::ApiHandlers {
    let api = Arc::new(Api::new(d.clone()));
    crate::daemon::ApiHandlers {
        ctl: api.clone(),
        metrics: Arc::new(MetricsOnly(api)),
    }
}

impl Handler for MetricsOnly {
    fn handle(&self, req: &Request) -> Response {
        if req.path.trim_end_matches('/') == "/metrics" {
            self.0.handle(req)
        } else {
            error_response(404, &ApiError::NotFound(req.path.clone()))
        }
    }
    fn reject(&self, status: u16, message: &str) -> Response {
        self.0.reject(status, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Args, Config, FileConfig};

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            query: None,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn routes_and_status_codes_without_a_client() {
        let d = tempfile::tempdir().unwrap();
        let args = Args {
            state_dir: Some(d.path().join("s")),
            budget: Some(tmem_api::Size(32 << 20)),
            ..Default::default()
        };
        let cfg = Config::resolve(&args, FileConfig::default(), None).unwrap();
        let running = Daemon::start(cfg, handlers).unwrap();
        let api = Api::new(running.daemon.clone());
        let status = |m: &str, p: &str, b: &str| api.handle(&req(m, p, b)).status;
        assert_eq!(status("GET", "/api/v1/status", ""), 200);
        assert_eq!(status("GET", "/api/v1/status/", ""), 200);
        assert_eq!(status("GET", "/metrics", ""), 200);
        assert_eq!(status("HEAD", "/metrics", ""), 405);
        assert_eq!(status("GET", "/api/v1/stats", ""), 200);
        assert_eq!(status("POST", "/api/v1/clients", "{}"), 201);
        assert_eq!(status("POST", "/api/v1/clients/1/freeze", ""), 200);
        assert_eq!(status("POST", "/api/v1/clients/1/melt", ""), 404);
        assert_eq!(status("PUT", "/api/v1/clients/1/thaw", ""), 405);
        assert_eq!(status("POST", "/api/v1/clients/99999999999/thaw", ""), 400);
        assert_eq!(
            status(
                "POST",
                "/api/v1/exports",
                r#"{"name":"x","kind":"swap","size":4096,"client":1}"#
            ),
            201
        );
        assert_eq!(status("GET", "/api/v1/exports/x", ""), 200);
        // Invalidation is for cached exports only.
        assert_eq!(status("POST", "/api/v1/exports/x/invalidate", ""), 409);
        assert_eq!(status("POST", "/api/v1/exports/nope/invalidate", ""), 404);
        assert_eq!(status("GET", "/api/v1/exports/x/invalidate", ""), 405);
        assert_eq!(status("DELETE", "/api/v1/clients/1", ""), 409);
        assert_eq!(
            status(
                "POST",
                "/api/v1/exports",
                r#"{"name":"y","kind":"swap","size":4095}"#
            ),
            400
        );
        assert_eq!(status("DELETE", "/api/v1/exports/x", ""), 204);
        assert_eq!(status("DELETE", "/api/v1/exports/x", ""), 404);
        assert_eq!(status("DELETE", "/api/v1/clients/1", ""), 204);
        assert_eq!(status("PUT", "/api/v1/budget", r#"{"bytes":0}"#), 400);
        assert_eq!(status("PUT", "/api/v1/budget", r#"{"bytes":"64M"}"#), 200);
        assert_eq!(running.daemon.engine().budget(), 64 << 20);
        assert_eq!(status("POST", "/api/v1/shrink", r#"{"bytes":4096}"#), 200);
        assert_eq!(status("POST", "/api/v1/compact", ""), 200);
        assert_eq!(
            status("POST", "/api/v1/compact", r#"{"max_moves":10}"#),
            200
        );
        assert_eq!(status("POST", "/api/v1/compact", r#"{"moves":10}"#), 400);
        assert_eq!(status("GET", "/api/v1/compact", ""), 405);
        assert_eq!(status("GET", "/api/v1/guests", ""), 200);
        assert_eq!(status("GET", "/", ""), 404);
        assert_eq!(status("GET", "/api/v1", ""), 404);
        // Error bodies carry the chain.
        let r = api.handle(&req("GET", "/api/v1/exports/nope", ""));
        let e: ErrorBody = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(e.chain, ["Get export failed", "Unknown export \"nope\""]);
        running.shutdown().unwrap();
        // A mutation after shutdown is refused with 503.
        assert_eq!(status("POST", "/api/v1/clients", "{}"), 503);
    }
}
