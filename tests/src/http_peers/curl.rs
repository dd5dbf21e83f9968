//! `curl` as the client: the tool people use to poke a service, in both HTTP/1.1 and h2c
//! (`--http2-prior-knowledge`), run inside a namespace (`ip netns exec NS curl ...`).
//!
//! Every call is bounded (`--max-time`), ignores `~/.curlrc` (`-q`) and any proxy settings of
//! the environment (`--noproxy '*'`, proxy variables removed), so what it talks to is exactly
//! the address the test names.

use std::process::Output;
use std::time::Duration;

use crate::netns::Netns;

/// Bound on one curl invocation.
pub const CURL_MAX_TIME: Duration = Duration::from_secs(30);

/// What curl printed for one request with `-i`: the final response.
#[derive(Debug, Clone)]
pub struct CurlResponse {
    /// `HTTP/1.1` or `HTTP/2`.
    pub version: String,
    pub status: u16,
    /// Header fields in order, names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl CurlResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `curl -i ARGS` in `ns`; panics unless curl exits 0 with a parseable response.
pub fn curl(ns: &Netns, args: &[&str]) -> CurlResponse {
    let out = run(ns, &["-i"], args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    parse(&stdout).unwrap_or_else(|reason| panic!("curl {}: {reason}\n{stdout}", shorten(args)))
}

/// Runs curl once with `url` repeated `times` (one connection, reused), bodies discarded; returns
/// what `--write-out` printed for each request, one line each. E.g. with
/// `%{http_code} %header{pillion-proxy-error}`.
pub fn curl_repeat(ns: &Netns, url: &str, times: usize, write_out: &str, args: &[&str]) -> Vec<String> {
    let write_out = format!("{write_out}\\n");
    let mut all: Vec<&str> = vec!["-w", &write_out];
    all.extend_from_slice(args);
    for _ in 0..times {
        all.extend_from_slice(&["-o", "/dev/null", url]);
    }
    let out = run(ns, &[], &all);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn run(ns: &Netns, mode: &[&str], args: &[&str]) -> Output {
    let max_time = CURL_MAX_TIME.as_secs().to_string();
    let mut cmd = ns.command("curl");
    cmd.args(["-q", "-sS", "--max-time", &max_time, "--noproxy", "*"])
        .args(mode)
        .args(args);
    for var in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "CURL_HOME",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running curl in {}: {e} (is curl installed?)", ns.name()));
    assert!(
        out.status.success(),
        "curl {} in {} failed ({}): {}",
        shorten(args),
        ns.name(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

/// The arguments for a message, long ones (e.g. a 64 KiB header) cut short.
fn shorten(args: &[&str]) -> String {
    let shown: Vec<String> = args
        .iter()
        .map(|arg| match arg.char_indices().nth(80) {
            Some((cut, _)) => format!("{}...({} bytes)", &arg[..cut], arg.len()),
            None => (*arg).to_owned(),
        })
        .collect();
    format!("{shown:?}")
}

/// Parses `-i` output; interim (1xx) responses before the final one are skipped.
fn parse(output: &str) -> Result<CurlResponse, String> {
    let mut rest = output;
    loop {
        let (head, body) = rest.split_once("\r\n\r\n").ok_or("no end of headers")?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut words = status_line.split_whitespace();
        let version = words.next().ok_or("empty status line")?.to_owned();
        let status: u16 = words
            .next()
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        if (100..200).contains(&status) && status != 101 {
            rest = body;
            continue;
        }
        let headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        return Ok(CurlResponse {
            version,
            status,
            headers,
            body: body.to_owned(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_final_response_after_interim_ones() {
        let out = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-App: a\r\n\r\nbody";
        let response = parse(out).unwrap();
        assert_eq!((response.version.as_str(), response.status), ("HTTP/1.1", 200));
        assert_eq!(response.header("x-app"), Some("a"));
        assert_eq!(response.body, "body");
        let h2 = parse("HTTP/2 504 \r\npillion-proxy-error: backend request timeout\r\n\r\n").unwrap();
        assert_eq!((h2.version.as_str(), h2.status), ("HTTP/2", 504));
    }
}
