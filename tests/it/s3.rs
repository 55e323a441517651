//! Presigned object-store URLs, against a real S3 implementation started by the test on
//! 127.0.0.1: `s3s-fs` (crates.io), which checks SigV4 signatures and presigned-URL expiry (the
//! first test proves it, since an S3 stand-in that does not, like moto, would prove nothing).
//! Objects are uploaded and URLs presigned with boto3, the standard client. An ESXi VMDK chain
//! (descriptors, flat and SESparse extents: six objects, one URL each, given with `--layer-url`)
//! and an XVA are mounted from it and compared with the same files mounted locally.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::common::*;
use crate::ssh::hypervisor_chains;

const KEY: &str = "vdiskfs-test-key";
const SECRET: &str = "vdiskfs-test-secret-0123456789";

/// Uploads `files` (path → key) into `bucket` and prints one JSON object key → presigned URL.
const PRESIGN: &str = r#"
import json, sys, boto3
from botocore.config import Config
endpoint, bucket, expires = sys.argv[1], sys.argv[2], int(sys.argv[3])
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=sys.argv[4],
                  aws_secret_access_key=sys.argv[5], region_name="us-east-1",
                  config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
try:
    s3.create_bucket(Bucket=bucket)
except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
    pass
urls = {}
for pair in sys.argv[6:]:
    path, key = pair.split("=", 1)
    if path:
        s3.upload_file(path, bucket, key)
    urls[key] = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires)
print(json.dumps(urls))
"#;

/// A running s3s-fs; stopped on drop.
struct S3 {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl S3 {
    fn start() -> S3 {
        need("s3s-fs");
        need("python3");
        let ok = Command::new("python3").args(["-c", "import boto3"]).status().is_ok_and(|s| s.success());
        if !ok {
            assert!(!in_ci(), "boto3 is required in CI");
            crate::harness::skip("boto3 not installed");
        }
        let dir = tmpdir();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("presign.py"), PRESIGN).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", KEY, "--secret-key", SECRET])
            .arg(dir.path().join("data"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("s3.log")).unwrap())
            .spawn()
            .expect("start s3s-fs");
        let s = S3 { dir, port, child };
        let up = wait_for(10, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(
            up,
            "s3s-fs did not start: {}",
            std::fs::read_to_string(s.dir.path().join("s3.log")).unwrap_or_default()
        );
        s
    }

    /// Uploads each (file, key) (a file of `None`: only presign) and presigns every key for
    /// `expires` seconds: key → URL.
    fn presign(&self, bucket: &str, expires: u32, files: &[(Option<&Path>, &str)]) -> HashMap<String, String> {
        let mut c = Command::new("python3");
        c.arg(self.dir.path().join("presign.py")).arg(format!("http://127.0.0.1:{}", self.port)).args([
            bucket,
            &expires.to_string(),
            KEY,
            SECRET,
        ]);
        for (f, k) in files {
            c.arg(format!("{}={k}", f.map(|p| p.display().to_string()).unwrap_or_default()));
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "presign: {}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status and the start of the body of a plain `GET url` with a range.
fn get(url: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut s = std::net::TcpStream::connect(host).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nRange: bytes=0-15\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let out = String::from_utf8_lossy(&raw).into_owned();
    let status = out.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, out)
}

crate::register!(the_s3_server_enforces_presigned_signatures_and_expiry);
fn the_s3_server_enforces_presigned_signatures_and_expiry() {
    let s3 = S3::start();
    let t = tmpdir();
    let f = t.path().join("obj");
    std::fs::write(&f, pattern(61, 4096)).unwrap();
    let good = s3.presign("objs", 600, &[(Some(&f), "obj")])["obj"].clone();
    let short = s3.presign("objs", 1, &[(None, "obj")])["obj"].clone();
    assert_eq!(get(&good).0, 206, "a valid presigned URL is served");
    let sig = good.rfind("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
    let mut forged = good.clone();
    let c = if &forged[sig..sig + 1] == "0" { "1" } else { "0" };
    forged.replace_range(sig..sig + 1, c);
    let (status, body) = get(&forged);
    assert_eq!(status, 403, "a forged signature is refused: {body}");
    assert!(body.contains("SignatureDoesNotMatch"), "{body}");
    let other_key = good.replacen("/objs/obj?", "/objs/other?", 1);
    assert_eq!(get(&other_key).0, 403, "a URL is signed for its own object");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let (status, body) = get(&short);
    assert_eq!(status, 403, "an expired presigned URL is refused: {body}");
    assert!(body.contains("expired"), "{body}");
}

/// `--layer-url NAME=URL` for every one of `names` but `top`, then `top`'s URL.
fn layer_args(urls: &HashMap<String, String>, names: &[&str], top: &str) -> Vec<String> {
    let mut a = vec!["--cache-size".to_string(), "0".to_string()];
    for (k, u) in urls {
        if *k != top && names.contains(&k.as_str()) {
            a.extend(["--layer-url".to_string(), format!("{k}={u}")]);
        }
    }
    a.push(urls[top].clone());
    a
}

crate::register!(a_vmdk_chain_and_an_xva_mount_from_presigned_urls);
fn a_vmdk_chain_and_an_xva_mount_from_presigned_urls() {
    need_fuse();
    let s3 = S3::start();
    let t = tmpdir();
    let chains = hypervisor_chains(t.path());
    let (vmdk_top, _) = &chains[0];
    let (xva, _) = &chains[3];
    let dir = vmdk_top.parent().unwrap();
    let files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 6, "descriptors and extents: {files:?}");
    let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    let mut up: Vec<(Option<&Path>, &str)> =
        files.iter().zip(&names).map(|(f, n)| (Some(f.as_path()), n.as_str())).collect();
    up.push((Some(xva.as_path()), "exports/vm.xva"));
    let urls = s3.presign("vms", 600, &up);
    let vmdk_names: Vec<&str> = names.iter().map(String::as_str).collect();
    for (img, top, chain) in [(vmdk_top, "vm-000002.vmdk", vmdk_names), (xva, "exports/vm.xva", vec![])] {
        let local = mount(&[img.as_os_str()]);
        let args = layer_args(&urls, &chain, top);
        let argv: Vec<&std::ffi::OsStr> = args.iter().map(os).collect();
        let remote = mount(&argv);
        let mut disks: Vec<String> = std::fs::read_dir(&local.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        disks.sort();
        for d in &disks {
            let want = std::fs::read(local.file(d)).unwrap();
            assert_same(&format!("{top}: {d} from presigned URLs"), &std::fs::read(remote.file(d)).unwrap(), &want);
        }
    }
    // Without the other files' URLs: one line that says which --layer-url is missing (a usage
    // error: exit status 2).
    let top = &urls["vm-000002.vmdk"];
    let o = vdiskfs(["info", "--cache-size", "0", top]);
    let e = stderr(&o);
    assert_eq!((o.status.code(), e.lines().count()), (Some(2), 1), "{e}");
    assert!(e.contains("--layer-url vm-000002-sesparse.vmdk=URL") && !e.contains("X-Amz-Signature"), "{e}");
}

crate::register!(an_expired_presigned_url_says_it_expired);
fn an_expired_presigned_url_says_it_expired() {
    let s3 = S3::start();
    let t = tmpdir();
    let (top, _) = hypervisor_chains(t.path()).remove(1);
    let urls = s3.presign("xen-sr", 1, &[(Some(&top), "top.vhd")]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let url = &urls["top.vhd"];
    let o = vdiskfs(["info", "--cache-size", "0", url]);
    let shown = url.split('?').next().unwrap();
    assert_one_line_error(&o, shown, &["the presigned URL expired at", "presign it again"]);
    assert!(!stderr(&o).contains("X-Amz-Signature"), "the signature is never shown: {}", stderr(&o));
}
