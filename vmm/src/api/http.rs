//! The HTTP/1.1 of the control API: one request head read (bounded) and parsed with
//! `httparse`, one response written, and the client side that `keyhold ctl` uses.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Longest request head accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Headers accepted in one request.
const MAX_HEADERS: usize = 32;

/// A request as the routes see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without its query string.
    pub path: String,
    /// The query string, if any (no route uses one: it is accepted and ignored).
    pub query: Option<String>,
}

/// An answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// The status code.
    pub code: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
    /// `Allow`, on a 405.
    pub allow: Option<&'static str>,
}

impl Response {
    /// A JSON answer.
    pub fn json(code: u16, body: &Value) -> Self {
        Self { code, content_type: "application/json", body: body.to_string(), allow: None }
    }

    /// A JSON `{"error": ...}` answer.
    pub fn error(code: u16, message: impl Into<String>) -> Self {
        Self::json(code, &serde_json::json!({ "error": message.into() }))
    }

    /// 405, naming the method that route takes.
    pub fn method_not_allowed(method: &str, path: &str, allow: &'static str) -> Self {
        Self {
            allow: Some(allow),
            ..Self::error(405, format!("{method} is not allowed on {path}; use {allow}"))
        }
    }

    fn reason(&self) -> &'static str {
        match self.code {
            200 => "OK",
            202 => "Accepted",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            409 => "Conflict",
            431 => "Request Header Fields Too Large",
            _ => "Service Unavailable",
        }
    }

    /// Writes the response; the connection closes after it.
    pub fn write_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        self.write_head(out)?;
        out.write_all(self.body.as_bytes())
    }

    /// Writes the status line and headers only: the answer to a HEAD request, which carries
    /// the Content-Length of the body it leaves out.
    pub fn write_head(&self, out: &mut impl Write) -> std::io::Result<()> {
        let allow = self.allow.map(|a| format!("Allow: {a}\r\n")).unwrap_or_default();
        write!(
            out,
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
            self.code,
            self.reason(),
            self.content_type,
            self.body.len()
        )
    }
}

/// Reads and parses one request head; the error is the response to send.
pub fn read_request(stream: &mut impl Read) -> Result<Request, Response> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).map_err(|_| Response::error(400, "incomplete request"))?;
        if n == 0 {
            return Err(Response::error(400, "incomplete request"));
        }
        head.extend_from_slice(&chunk[..n]);
        if head.len() > MAX_HEAD {
            return Err(Response::error(431, format!("request head over {MAX_HEAD} bytes")));
        }
        if let Some(request) = parse(&head)? {
            return Ok(request);
        }
    }
}

/// The request in `head`, or `None` while it is incomplete.
fn parse(head: &[u8]) -> Result<Option<Request>, Response> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Response::error(431, format!("more than {MAX_HEADERS} headers")))
        }
        Err(e) => return Err(Response::error(400, format!("malformed request: {e}"))),
    }
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Err(Response::error(400, "malformed request line"));
    };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_owned())),
        None => (target, None),
    };
    Ok(Some(Request { method: method.to_owned(), path: path.to_owned(), query }))
}

/// `keyhold ctl`: sends one request to a node's API and returns its status code and body.
pub fn request(socket: &Path, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: keyhold\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    match parsed.parse(&response) {
        Ok(httparse::Status::Complete(body_start)) => {
            let code = parsed.code.ok_or_else(|| bad("no status code".into()))?;
            Ok((code, String::from_utf8_lossy(&response[body_start..]).into_owned()))
        }
        Ok(httparse::Status::Partial) => Err(bad("the answer ended early".into())),
        Err(e) => Err(bad(format!("not an HTTP answer: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Request, Response> {
        read_request(&mut text.as_bytes())
    }

    #[test]
    fn requests_parse_with_their_query_apart() {
        let r = read("GET /v1/audit?limit=5 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/v1/audit"));
        assert_eq!(r.query.as_deref(), Some("limit=5"));
        let r = read("POST /v1/channels/1/0x10/revoke HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!((r.method.as_str(), r.query), ("POST", None));
    }

    #[test]
    fn malformed_heads_are_refused_with_400_or_431() {
        for bad in ["GET\r\n\r\n", "GET / HTTP/2.0\r\n\r\n", "GET / HTTP/1.1\r\nBad Header\r\n\r\n"]
        {
            assert_eq!(read(bad).unwrap_err().code, 400, "{bad:?}");
        }
        assert_eq!(read("GET / HTTP/1.1\r\n").unwrap_err().code, 400, "cut short");
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(read(&long).unwrap_err().code, 431);
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X: 1\r\n".repeat(MAX_HEADERS + 1));
        assert_eq!(read(&many).unwrap_err().code, 431);
    }

    #[test]
    fn a_405_names_the_allowed_method() {
        let mut out = Vec::new();
        Response::method_not_allowed("GET", "/v1/x", "POST").write_to(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{text}");
        assert!(text.contains("\r\nAllow: POST\r\n"), "{text}");
    }
}
