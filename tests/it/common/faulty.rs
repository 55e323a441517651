//! A small HTTP/1.1 server on 127.0.0.1 that serves one file with range requests, and misbehaves
//! on demand: answers a range request with 200 and the whole file, closes in the middle of an
//! answer, stalls, or serves another version (a new ETag). Keep-alive, a thread per connection;
//! everything stops when it is dropped.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    None = 0,
    Whole200 = 1,
    CloseMidway = 2,
    Stall = 3,
    NewVersion = 4,
}

struct State {
    data: Vec<u8>,
    fault: AtomicU8,
    stop: AtomicBool,
    requests: AtomicU64,
    conns: Mutex<Vec<TcpStream>>,
}

pub struct Faulty {
    pub port: u16,
    st: Arc<State>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Faulty {
    pub fn start(data: Vec<u8>) -> Faulty {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let st = Arc::new(State {
            data,
            fault: AtomicU8::new(0),
            stop: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let s = st.clone();
        let thread = std::thread::spawn(move || {
            for c in l.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(c) = c else { continue };
                if let Ok(k) = c.try_clone() {
                    s.conns.lock().unwrap().push(k);
                }
                let s = s.clone();
                std::thread::spawn(move || serve(&s, c));
            }
        });
        Faulty { port, st, thread: Some(thread) }
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    pub fn set(&self, f: Fault) {
        self.st.fault.store(f as u8, Ordering::SeqCst);
    }

    pub fn requests(&self) -> u64 {
        self.st.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Faulty {
    fn drop(&mut self) {
        self.st.stop.store(true, Ordering::SeqCst);
        for c in self.st.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `bytes=A-B` → (A, B), clipped to the file.
fn range(v: &str, size: u64) -> Option<(u64, u64)> {
    let (a, b) = v.trim().strip_prefix("bytes=")?.split_once('-')?;
    let a: u64 = a.parse().ok()?;
    let b: u64 = b.parse::<u64>().ok()?.min(size - 1);
    (a <= b).then_some((a, b))
}

fn serve(st: &State, c: TcpStream) {
    let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut w = c;
    loop {
        let mut head = Vec::new();
        loop {
            if st.stop.load(Ordering::SeqCst) {
                return;
            }
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => head.push(line),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return,
            }
        }
        st.requests.fetch_add(1, Ordering::SeqCst);
        let size = st.data.len() as u64;
        let want = head
            .iter()
            .find_map(|h| {
                h.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("range")).map(|(_, v)| v.to_string())
            })
            .and_then(|v| range(&v, size));
        let fault = st.fault.load(Ordering::SeqCst);
        let etag = if fault == Fault::NewVersion as u8 { "\"v2\"" } else { "\"v1\"" };
        let common =
            format!("ETag: {etag}\r\nLast-Modified: Sun, 06 Nov 1994 08:49:37 GMT\r\nAccept-Ranges: bytes\r\n");
        let ok = match (fault, want) {
            (3, _) => {
                while !st.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                return;
            }
            (1, _) | (_, None) => {
                let h = format!("HTTP/1.1 200 OK\r\n{common}Content-Length: {size}\r\n\r\n");
                w.write_all(h.as_bytes()).and_then(|_| w.write_all(&st.data))
            }
            (f, Some((a, b))) => {
                let body = &st.data[a as usize..=b as usize];
                let h = format!(
                    "HTTP/1.1 206 Partial Content\r\n{common}Content-Range: bytes {a}-{b}/{size}\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                // Cut within the first chunk asked for, so that no chunk of a merged run arrives whole.
                let sent = if f == 2 { &body[..(body.len() / 2).min(4000)] } else { body };
                let r = w.write_all(h.as_bytes()).and_then(|_| w.write_all(sent));
                if f == 2 {
                    let _ = w.flush();
                    let _ = w.shutdown(std::net::Shutdown::Both);
                    return;
                }
                r
            }
        };
        if ok.is_err() {
            return;
        }
    }
}
