//! For a host without an SFTP subsystem: ranges read by `dd` on the host, through one `ssh -M`
//! master connection (each request is a channel on it, a few at a time), and the same checks as
//! over SFTP: after each range the host's `stat` must still show the size and mtime seen at open.
//! Needs a POSIX shell with `dd`, `stat -c` and `readlink -f` on the host (ESXi's busybox has them).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::ssh::{SshConns, collect_stderr, command};
use super::{Fetched, Refusal, RemoteError, RemoteKind, RemoteStat};

/// A master connection that `dd` and `stat` run through.
pub struct DdConn {
    host: String,
    /// `ssh` with our options and `-S <socket>`, without the host.
    argv: Vec<String>,
    target: String,
    dir: PathBuf,
    /// MaxSessions is 10 by default: stay below it.
    slots: Semaphore,
    _master: tokio::process::Child,
}

impl Drop for DdConn {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes control directories left by vdiskfs processes that are gone (a mount daemon ends
/// without dropping its connections).
fn sweep_stale_dirs() {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("vdiskfs-ssh-").and_then(|r| r.split('-').next()) else { continue };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// `s` quoted for a POSIX shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn kind_of_mode(mode: u32) -> RemoteKind {
    match mode & 0o170000 {
        0o100000 => RemoteKind::Regular,
        0o060000 => RemoteKind::BlockDevice,
        0o040000 => RemoteKind::Directory,
        0o120000 => RemoteKind::Symlink,
        0o010000 => RemoteKind::Other("FIFO"),
        0o140000 => RemoteKind::Other("socket"),
        0o020000 => RemoteKind::Other("character device"),
        _ => RemoteKind::Other("special file"),
    }
}

/// `"<size> <mtime> <hex mode>"` as `stat -c '%s %Y %f'` prints it.
fn parse_stat(line: &str) -> Option<RemoteStat> {
    let mut w = line.split_whitespace();
    let size = w.next()?.parse().ok()?;
    let mtime = w.next()?.parse().ok()?;
    let kind = match w.next() {
        Some(m) => kind_of_mode(u32::from_str_radix(m, 16).ok()?),
        None => RemoteKind::Regular,
    };
    Some(RemoteStat { size, mtime, kind })
}

impl DdConn {
    pub async fn connect(conns: &SshConns) -> Result<DdConn, RemoteError> {
        let host = conns.host.to_string();
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vdiskfs-ssh-{}-{n}", std::process::id()));
        let local = |e: std::io::Error| RemoteError::Local(format!("{}: {e}", dir.display()));
        sweep_stale_dirs();
        std::fs::create_dir_all(&dir).map_err(local)?;
        let sock = dir.join("ctl").to_string_lossy().into_owned();
        let mut argv = conns.argv();
        argv.extend(["-S".to_string(), sock.clone()]);
        // The master's session reads our pipe: when vdiskfs ends, however it ends, the pipe
        // closes, the session ends and so does the master (ControlPersist=no).
        let mut master = command(&argv, &["-M", "-o", "ControlPersist=no", "--", &conns.host.host, "cat >/dev/null"])
            .stdin(Stdio::piped())
            .spawn()
            .map_err(|e| RemoteError::Connect { host: host.clone(), detail: format!("cannot run ssh: {e}") })?;
        let err = collect_stderr(master.stderr.take());
        while !std::path::Path::new(&sock).exists() {
            if let Ok(Some(_)) = master.try_wait() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = std::fs::remove_dir_all(&dir);
                return Err(RemoteError::Connect { host, detail: err.lock().clone() });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        argv.extend(["-o".to_string(), "ControlMaster=no".to_string()]);
        let target = conns.host.host.clone();
        Ok(DdConn { host, argv, target, dir, slots: Semaphore::new(8), _master: master })
    }

    /// Runs `script` on the host: its exit status, stdout and stderr.
    async fn run(&self, script: &str) -> Result<(bool, Vec<u8>, String), RemoteError> {
        let _slot = self.slots.acquire().await.map_err(|_| RemoteError::Local("closed".into()))?;
        let out = command(&self.argv, &["--", &self.target, script])
            .stdout(Stdio::piped())
            .output()
            .await
            .map_err(|e| RemoteError::Lost { host: self.host.clone(), detail: e.to_string() })?;
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        // 255: ssh itself failed (the connection), not the command.
        if out.status.code() == Some(255) {
            let detail = err.lines().last().unwrap_or("ssh failed").to_string();
            return Err(RemoteError::Lost { host: self.host.clone(), detail });
        }
        Ok((out.status.success(), out.stdout, err))
    }

    fn refused(what: &'static str, err: &str) -> RemoteError {
        let detail = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("failed").trim().to_string();
        let d = detail.to_ascii_lowercase();
        let kind = if d.contains("no such file") {
            Refusal::NotFound
        } else if d.contains("permission denied") {
            Refusal::Denied
        } else {
            Refusal::Other
        };
        RemoteError::refused(what, detail, kind)
    }

    pub async fn stat(&self, path: &str, follow: bool) -> Result<Option<RemoteStat>, RemoteError> {
        let l = if follow { "-L " } else { "" };
        let (ok, out, err) = self.run(&format!("stat {l}-c '%s %Y %f' -- {}", quote(path))).await?;
        if !ok {
            return match Self::refused("stat", &err) {
                RemoteError::Refused { kind: Refusal::NotFound, .. } => Ok(None),
                e => Err(e),
            };
        }
        let text = String::from_utf8_lossy(&out);
        parse_stat(text.trim()).map(Some).ok_or_else(|| RemoteError::Local(format!("cannot parse stat: {text}")))
    }

    pub async fn realpath(&self, path: &str) -> Result<String, RemoteError> {
        let (ok, out, err) = self.run(&format!("readlink -f -- {}", quote(path))).await?;
        if !ok {
            return Err(Self::refused("realpath", &err));
        }
        Ok(String::from_utf8_lossy(&out).trim().to_string())
    }

    pub async fn check_open(&self, path: &str, st: RemoteStat) -> Result<u64, RemoteError> {
        let q = quote(path);
        let size = if st.kind == RemoteKind::BlockDevice {
            format!("; cat /sys/class/block/\"$(basename \"$(readlink -f -- {q})\")\"/size")
        } else {
            String::new()
        };
        let (ok, out, err) = self.run(&format!(": < {q}{size}")).await?;
        if !ok {
            return Err(Self::refused("open", &err));
        }
        if st.kind != RemoteKind::BlockDevice {
            return Ok(st.size);
        }
        let text = String::from_utf8_lossy(&out);
        text.trim()
            .parse::<u64>()
            .map(|s| s * 512)
            .map_err(|_| RemoteError::Local(format!("cannot find the size of the block device: {text}")))
    }

    pub async fn read(&self, path: &str, off: u64, len: usize, expect: RemoteStat) -> Fetched {
        let bs = [65536u64, 4096, 512].into_iter().find(|b| off.is_multiple_of(*b)).unwrap_or(1);
        let (skip, count) = (off / bs, (len as u64).div_ceil(bs));
        let q = quote(path);
        let script = format!(
            "dd if={q} bs={bs} skip={skip} count={count} 2>/dev/null; r=$?; echo \"VDISKFS $(stat -L -c '%s %Y' -- {q})\" >&2; exit $r"
        );
        let (ok, mut out, err) = self.run(&script).await?;
        let now = err.lines().find_map(|l| l.strip_prefix("VDISKFS ")).and_then(parse_stat);
        if !ok {
            let why = err.lines().filter(|l| !l.starts_with("VDISKFS")).collect::<Vec<_>>().join(" ");
            return Err(Self::refused("dd", if why.is_empty() { "dd failed" } else { &why }));
        }
        match now {
            Some(n) if expect.kind != RemoteKind::Regular || (n.size, n.mtime) == (expect.size, expect.mtime) => {}
            Some(n) => {
                return Err(RemoteError::Changed {
                    what: format!("size {} → {}, mtime {} → {}", expect.size, n.size, expect.mtime, n.mtime),
                });
            }
            None => return Err(RemoteError::Local(format!("no stat after dd: {err}"))),
        }
        out.truncate(len);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_and_quotes() {
        assert_eq!(
            parse_stat("1048576 1700000000 81a4"),
            Some(RemoteStat { size: 1 << 20, mtime: 1_700_000_000, kind: RemoteKind::Regular })
        );
        assert_eq!(parse_stat("0 5 61b0").unwrap().kind, RemoteKind::BlockDevice);
        assert_eq!(quote("/a b/it's.vhd"), r"'/a b/it'\''s.vhd'");
        let e = DdConn::refused("dd", "dd: can't open '/vmfs/x-000002-sesparse.vmdk': Device or resource busy\n");
        assert!(matches!(e, RemoteError::InUse { .. }), "{e}");
    }
}
