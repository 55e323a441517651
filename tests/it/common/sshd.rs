//! A real OpenSSH server for the remote tests: `sshd` on 127.0.0.1 with its own config, host
//! key, authorized key and known_hosts, all made at test time in a temporary directory, and the
//! client options that reach it. Its SFTP subsystem is `sftp-server` behind a small relay that
//! counts the bytes served (so a test can tell what was fetched) and, when the file `slow`
//! exists, sends them slowly (so a test can act in the middle of a long read).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{need, sh, tmpdir, wait_for};

const RELAY: &str = r#"
import os, subprocess, sys, time
d = sys.argv[1]
p = subprocess.Popen([sys.argv[2]], stdout=subprocess.PIPE, bufsize=0)
count = os.path.join(d, "count-%d" % os.getpid())
total = 0
while True:
    b = os.read(p.stdout.fileno(), 1 << 16)
    if not b:
        break
    if os.path.exists(os.path.join(d, "slow")):
        time.sleep(0.02)
    v = memoryview(b)
    while v:
        v = v[os.write(1, v):]
    total += len(b)
    with open(count + ".tmp", "w") as f:
        f.write(str(total))
    os.rename(count + ".tmp", count)
"#;

/// A running sshd; stopped (with every process it started) on drop.
pub struct Sshd {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn sftp_server() -> Option<PathBuf> {
    ["/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/libexec/sftp-server"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Sshd {
    /// Starts sshd (skips the test locally when OpenSSH's server is not installed).
    pub fn start() -> Sshd {
        need("sshd");
        need("ssh");
        need("python3");
        need("unshare");
        let Some(server) = sftp_server() else {
            assert!(!super::in_ci(), "sftp-server is required in CI");
            crate::harness::skip("sftp-server not installed");
        };
        let dir = tmpdir();
        let d = dir.path();
        sh(&format!(
            "ssh-keygen -q -t ed25519 -N '' -f {0}/host && ssh-keygen -q -t ed25519 -N '' -f {0}/key",
            d.display()
        ));
        std::fs::copy(d.join("key.pub"), d.join("authorized_keys")).unwrap();
        std::fs::write(d.join("relay.py"), RELAY).unwrap();
        // The session's PATH is the system's: not a per-user shim.
        let python = if Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3".to_string()
        } else {
            sh("command -v python3").trim().to_string()
        };
        let wrapper = d.join("sftp-counting");
        std::fs::write(
            &wrapper,
            format!("#!/bin/sh\nexec {python} {}/relay.py {} {}\n", d.display(), d.display(), server.display()),
        )
        .unwrap();
        sh(&format!("chmod 755 {}", wrapper.display()));
        std::fs::create_dir_all("/run/sshd").ok();
        let port = free_port();
        let host_pub = std::fs::read_to_string(d.join("host.pub")).unwrap();
        std::fs::write(d.join("known_hosts"), format!("[127.0.0.1]:{port} {host_pub}")).unwrap();
        let mut s = Sshd { dir, port, child: None };
        s.write_config(&format!("Subsystem sftp {}", wrapper.display()));
        s.restart();
        s
    }

    /// Rewrites sshd_config with `subsystem` (a `Subsystem …` line, or nothing).
    pub fn write_config(&self, subsystem: &str) {
        let d = self.dir.path().display();
        let cfg = format!(
            "Port {}\nListenAddress 127.0.0.1\nHostKey {d}/host\nAuthorizedKeysFile {d}/authorized_keys\n\
             PidFile none\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nPermitRootLogin yes\nLogLevel ERROR\nMaxStartups 100\n{subsystem}\n",
            self.port
        );
        std::fs::write(self.dir.path().join("sshd_config"), cfg).unwrap();
    }

    /// (Re)starts the server on the same port, keys and config. It runs in a mount namespace
    /// of its own where the user's `~/.bashrc` is empty: sshd runs every session through the
    /// login shell, and bash reads that file for ssh sessions (a developer's rc can be slow or
    /// wait for a terminal, which would time the tests out).
    pub fn restart(&mut self) {
        self.kill();
        let d = self.dir.path();
        let sshd = sh("command -v sshd").trim().to_string();
        std::fs::write(d.join("empty-rc"), b"").unwrap();
        let script = format!(
            "for f in \"$HOME/.bashrc\" \"$HOME/.bash_profile\" \"$HOME/.profile\"; do \
             [ -f \"$f\" ] && mount --bind {d}/empty-rc \"$f\"; done; exec {sshd} -D -e -f {d}/sshd_config",
            d = d.display()
        );
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("sshd.log")).unwrap())
            .spawn()
            .expect("start sshd");
        self.child = Some(child);
        let up = wait_for(10, || std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok());
        assert!(up, "sshd did not start: {}", std::fs::read_to_string(d.join("sshd.log")).unwrap_or_default());
    }

    /// Kills the server and every process it started (the sessions, the SFTP relays).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let mut pids = vec![c.id()];
            let mut i = 0;
            while i < pids.len() {
                pids.extend(children(pids[i]));
                i += 1;
            }
            for p in pids {
                // SAFETY: kill(2) on processes this test started (sshd and its descendants).
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
            let _ = c.wait();
        }
    }

    /// The `--ssh-command` that reaches this server and nothing else.
    pub fn ssh_command(&self) -> String {
        let d = self.dir.path().display();
        format!(
            "ssh -F /dev/null -i {d}/key -o UserKnownHostsFile={d}/known_hosts -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"
        )
    }

    /// `ssh://root@127.0.0.1:PORT/<path>`.
    pub fn url(&self, path: &Path) -> String {
        format!("ssh://root@127.0.0.1:{}{}", self.port, path.display())
    }

    /// Bytes the SFTP subsystem has sent since the server first started.
    pub fn served(&self) -> u64 {
        let mut total = 0;
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("count-") && !n.ends_with(".tmp") {
                total += std::fs::read_to_string(e.path()).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
            }
        }
        total
    }

    /// Makes the SFTP relay send slowly (about 3 MB/s per session) or not.
    pub fn slow(&self, yes: bool) {
        let p = self.dir.path().join("slow");
        if yes {
            std::fs::write(p, b"").unwrap();
        } else {
            let _ = std::fs::remove_file(p);
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in rd.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
            }
        }
    }
    out
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.kill();
        std::thread::sleep(Duration::from_millis(10));
    }
}
