//! A real nginx for the HTTP tests: started on 127.0.0.1 with its own config in a temporary
//! directory (never the system service), TLS with a server certificate signed by a CA made at
//! test time, basic auth, and ESXi's URL layout: `/folder/<path>?dcPath=ha-datacenter&dsName=<ds>`
//! serves `<root>/<ds>/<path>`, and a request without the right query is answered 404, so a
//! parent found without its query string is not found. Like ESXi, it sets a session cookie.
//! The access log records the bytes and the cookie of every answer.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{need, sh, tmpdir, wait_for};

pub const USER: &str = "root";
pub const PASSWORD: &str = "vmware-pw";

/// A running nginx; stopped on drop.
pub struct Nginx {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A CA and a server certificate for 127.0.0.1 signed by it, in `d`: ca.pem, srv.pem, srv.key.
pub fn make_certs(d: &Path) {
    need("openssl");
    let d = d.display();
    sh(&format!(
        "cd {d} && \
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem \
           -days 2 -subj /CN=vdiskfs-test-CA 2>/dev/null && \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout srv.key -out srv.csr \
           -subj /CN=127.0.0.1 2>/dev/null && \
         printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext && \
         openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile ext 2>/dev/null"
    ));
}

impl Nginx {
    /// Serves `root` (datastores are its subdirectories) over TLS with basic auth.
    pub fn start(root: &Path) -> Nginx {
        need("nginx");
        let dir = tmpdir();
        let d = dir.path();
        make_certs(d);
        let hash = sh(&format!("openssl passwd -apr1 {PASSWORD}"));
        std::fs::write(d.join("htpasswd"), format!("{USER}:{}\n", hash.trim())).unwrap();
        std::fs::create_dir_all(d.join("tmp")).unwrap();
        let port = free_port();
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 { "user root;" } else { "" };
        let (d, root) = (d.display(), root.display());
        let conf = format!(
            r#"{user}
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
    log_format bytes '$body_bytes_sent $status "$http_cookie"';
    access_log {d}/access.log bytes;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {d}/srv.pem;
        ssl_certificate_key {d}/srv.key;
        auth_basic "ESXi";
        auth_basic_user_file {d}/htpasswd;
        location ~ ^/folder/(?<rest>.*)$ {{
            if ($arg_dcPath != "ha-datacenter") {{ return 404; }}
            add_header Set-Cookie 'vmware_soap_session="52c0ffee"; Path=/; HttpOnly; Secure';
            alias {root}/$arg_dsName/$rest;
        }}
    }}
}}
"#
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let nginx = sh("command -v nginx").trim().to_string();
        let child = Command::new(nginx)
            .args(["-p", &dir.path().display().to_string(), "-c"])
            .arg(dir.path().join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .expect("start nginx");
        let n = Nginx { dir, port, child: Some(child) };
        let up = wait_for(10, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(up, "nginx did not start: {}", n.log("stderr.log") + &n.log("error.log"));
        n
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// The ESXi-style URL of `path` (relative to the datastore `ds`).
    pub fn url(&self, ds: &str, path: &str) -> String {
        format!("https://127.0.0.1:{}/folder/{path}?dcPath=ha-datacenter&dsName={ds}", self.port)
    }

    /// The CA that signed the server's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server certificate's SHA-256, as openssl prints it (`AB:CD:…`).
    pub fn fingerprint(&self) -> String {
        let out =
            sh(&format!("openssl x509 -noout -fingerprint -sha256 -in {}", self.dir.path().join("srv.pem").display()));
        out.trim().rsplit('=').next().unwrap().to_string()
    }

    /// Body bytes sent so far, and the answers (status, cookie sent) in order.
    pub fn served(&self) -> (u64, Vec<(u16, String)>) {
        let mut total = 0;
        let mut answers = Vec::new();
        for l in self.log("access.log").lines() {
            let mut w = l.splitn(3, ' ');
            total += w.next().and_then(|b| b.parse::<u64>().ok()).unwrap_or(0);
            let status = w.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            answers.push((status, w.next().unwrap_or_default().trim_matches('"').to_string()));
        }
        (total, answers)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM: a fast stop; the workers follow their master.
            // SAFETY: kill(2) on the nginx master this test started.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}
