//! A hostile cache server: it speaks just enough of the kiln-cache-server
//! API for an executor to believe it (lookups answered from entries the
//! test gives, uploads accepted), and answers blob downloads the way a
//! dying, stalling, truncating, corrupting or lying server would. Every
//! request line is recorded so a test can check what the executor sent.
//! It is a real peer on a loopback port, served by threads; dropped, it
//! stops accepting.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;

/// How `GET /v1/blobs/<digest>` is answered.
#[derive(Debug, Clone)]
pub enum BlobAnswer {
    /// 404, as for a blob the cache does not have.
    NotFound,
    /// The bytes, intact.
    Serve(Vec<u8>),
    /// The right Content-Length, half of the bytes, then the connection closes.
    Truncate(Vec<u8>),
    /// The right length, one byte changed: the digest does not match.
    Corrupt(Vec<u8>),
    /// A chunked body that never ends.
    Endless,
    /// The right Content-Length and half of the bytes, then nothing, for
    /// two minutes.
    Stall(Vec<u8>),
    /// The connection closes without an answer (the server died).
    Close,
}

/// How `POST /v1/lookup` is answered.
#[derive(Debug, Clone)]
pub enum LookupAnswer {
    /// `{"entries": {...}}` with these entries (key hex -> entry JSON).
    Entries(Vec<(String, String)>),
    /// A chunked answer that never ends.
    Endless,
}

pub struct HostileCache {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl HostileCache {
    pub fn start(lookup: LookupAnswer, blobs: HashMap<String, BlobAnswer>) -> Result<Self> {
        let port = crate::service_port();
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new((lookup, blobs));
        {
            let requests = requests.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let requests = requests.clone();
                    let shared = shared.clone();
                    std::thread::spawn(move || {
                        let _ = serve(conn, &shared.0, &shared.1, &requests);
                    });
                }
            });
        }
        Ok(HostileCache {
            port,
            requests,
            stop,
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Request lines received so far (`PUT /v1/entries/<key>`, ...).
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for HostileCache {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(
    conn: TcpStream,
    lookup: &LookupAnswer,
    blobs: &HashMap<String, BlobAnswer>,
    requests: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let mut length = 0u64;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    // Uploads are read and thrown away.
    std::io::copy(&mut (&mut reader).take(length), &mut std::io::sink())?;
    let first = first.trim().to_string();
    requests.lock().unwrap().push(first.clone());
    let mut parts = first.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let respond = |out: &mut TcpStream, status: &str, body: &[u8]| {
        write!(
            out,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        out.write_all(body)
    };
    let endless = |out: &mut TcpStream| -> std::io::Result<()> {
        write!(
            out,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )?;
        let chunk = format!("10000\r\n{}\r\n", "{".repeat(0x10000));
        loop {
            out.write_all(chunk.as_bytes())?;
        }
    };
    match (method, path) {
        ("POST", "/v1/lookup") => match lookup {
            LookupAnswer::Endless => endless(&mut out),
            LookupAnswer::Entries(entries) => {
                let body = format!(
                    "{{\"entries\":{{{}}}}}",
                    entries
                        .iter()
                        .map(|(k, e)| format!("\"{k}\":{e}"))
                        .collect::<Vec<_>>()
                        .join(",")
                );
                respond(&mut out, "200 OK", body.as_bytes())
            }
        },
        ("GET", p) if p.starts_with("/v1/blobs/") => {
            let digest = &p["/v1/blobs/".len()..];
            let header = |out: &mut TcpStream, n: usize| {
                write!(
                    out,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
                )
            };
            match blobs.get(digest).cloned().unwrap_or(BlobAnswer::NotFound) {
                BlobAnswer::NotFound => respond(&mut out, "404 Not Found", b"{}"),
                BlobAnswer::Serve(bytes) => {
                    header(&mut out, bytes.len())?;
                    out.write_all(&bytes)
                }
                BlobAnswer::Truncate(bytes) => {
                    header(&mut out, bytes.len())?;
                    out.write_all(&bytes[..bytes.len() / 2])
                }
                BlobAnswer::Corrupt(mut bytes) => {
                    let last = bytes.len() - 1;
                    bytes[last] ^= 0xff;
                    header(&mut out, bytes.len())?;
                    out.write_all(&bytes)
                }
                BlobAnswer::Endless => endless(&mut out),
                BlobAnswer::Stall(bytes) => {
                    header(&mut out, bytes.len())?;
                    out.write_all(&bytes[..bytes.len() / 2])?;
                    out.flush()?;
                    std::thread::sleep(Duration::from_secs(120));
                    Ok(())
                }
                BlobAnswer::Close => Ok(()),
            }
        }
        ("HEAD", _) => respond(&mut out, "404 Not Found", b""),
        ("PUT", _) => respond(&mut out, "201 Created", b"{}"),
        _ => respond(&mut out, "404 Not Found", b"{}"),
    }
}
