//! Operations around vdiskfs: the mount(8) helper and fstab, the systemd unit, the
//! hypervisor discovery helper, the Ansible playbook.

mod ansible;
mod discover;
mod mount_t;
mod sync_ssh;
mod unit;

use std::path::PathBuf;

/// A script in mount-helpers/.
pub fn helper(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("mount-helpers").join(name)
}
