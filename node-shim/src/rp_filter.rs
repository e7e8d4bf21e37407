//! Reverse-path filtering: what the shim relaxes, the record of the values it found, and putting
//! them back on `sluice-shim uninstall`.
//!
//! The record must outlive the shim (a restarted shim finds the values its predecessor relaxed,
//! which are not the node's) and go away with the node's other state at reboot, when the sysctls
//! are reset too: it lives in the bpffs directory. bpffs holds pinned objects, directories and
//! symlinks but no regular files, so the record is a directory of symlinks, one per setting,
//! named after it (`all`, `default` or an interface) and pointing at the value found:
//! `<bpffs dir>/rp_filter/eth0 -> 1`.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::{
    error::{Error, Result},
    netdev::{proc_sys, sysctl},
};

/// The record's directory under the bpffs directory.
pub const RECORD_DIR: &str = "rp_filter";

/// The rp_filter values the node had before Sluice changed them.
#[derive(Clone, Debug)]
pub struct Record {
    dir: PathBuf,
}

impl Record {
    /// The record kept in `bpffs_dir` (the shim's `--bpffs-dir`).
    pub fn in_bpffs(bpffs_dir: &Path) -> Self {
        Record {
            dir: bpffs_dir.join(RECORD_DIR),
        }
    }

    /// Records `found` as the value of `conf` (`all`, `default` or an interface), unless a value
    /// is recorded already: that one is the node's, `found` may be one Sluice set.
    fn remember(&self, conf: &str, found: u32) -> Result<()> {
        fs::create_dir_all(&self.dir)
            .map_err(|e| Error::io(format!("creating {}", self.dir.display()), e))?;
        let entry = self.dir.join(conf);
        match std::os::unix::fs::symlink(found.to_string(), &entry) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(Error::io(
                format!("recording rp_filter in {}", entry.display()),
                e,
            )),
            _ => Ok(()),
        }
    }

    /// The recorded values, by setting.
    pub fn entries(&self) -> Result<Vec<(String, u32)>> {
        let listing = match fs::read_dir(&self.dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("listing {}", self.dir.display()), e)),
        };
        let mut entries = Vec::new();
        for entry in listing.flatten() {
            let conf = entry.file_name().to_string_lossy().into_owned();
            let value = fs::read_link(entry.path())
                .ok()
                .and_then(|v| v.to_str().and_then(|v| v.parse().ok()));
            match value {
                Some(value) => entries.push((conf, value)),
                None => tracing::warn!(entry = %entry.path().display(), "not an rp_filter record; ignored"),
            }
        }
        entries.sort();
        Ok(entries)
    }
}

fn key(conf: &str) -> String {
    format!("net/ipv4/conf/{conf}/rp_filter")
}

fn read(conf: &str) -> u32 {
    fs::read_to_string(proc_sys().join(key(conf)))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Sets `conf` to `value`, recording what it was first.
fn change(record: &Record, conf: &str, found: u32, value: u32) -> Result<()> {
    record.remember(conf, found)?;
    sysctl(&key(conf), &value.to_string())
}

/// Turns reverse-path filtering off on the tunnel device, keeping every other interface as it is.
///
/// Decapsulated requests come from pod IPs that the main table routes elsewhere, and the device
/// has no address, so even loose mode drops them (`__fib_validate_source`: no address, no
/// exemption). The effective setting is `max(all, device)`, so when `all` is not 0 it is lowered
/// to 0 after raising every other interface's own value to the old `all` (their behaviour is
/// unchanged), as Cilium does. The tunnel device is Sluice's own (uninstall deletes it): its value
/// is not recorded.
pub fn relax(tunnel_device: &str, record: &Record) -> Result<()> {
    let all = read("all");
    if all != 0 {
        for entry in fs::read_dir(proc_sys().join("net/ipv4/conf"))
            .map_err(|e| Error::io("listing ipv4 conf", e))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "all" || name == tunnel_device {
                continue;
            }
            let own = read(&name);
            if own < all {
                change(record, &name, own, all)?;
            }
        }
        change(record, "all", all, 0)?;
    }
    sysctl(&key(tunnel_device), "0")
}

/// Strict reverse-path filtering (1) on an egress interface becomes loose (2): replies to the
/// egress IP may arrive on an interface that is not the route back to their source. Off (0) and
/// loose stay as they are.
pub fn loosen(interface: &str, record: &Record) -> Result<()> {
    if read(interface) == 1 {
        change(record, interface, 1, 2)?;
    }
    Ok(())
}

/// Writes back every recorded value, then removes the record. Interfaces gone since are skipped
/// (a pod's veth, say). `all` goes first: an interface raised to it is then not, even for a
/// moment, looser than before Sluice when it is lowered. Without a record (the shim
/// changed nothing, or a version that kept none did), it does nothing.
pub fn restore(record: &Record) -> Result<()> {
    let mut entries = record.entries()?;
    entries.sort_by_key(|(conf, _)| match conf.as_str() {
        "all" => 0,
        "default" => 1,
        _ => 2,
    });
    for (conf, value) in &entries {
        if !proc_sys().join(key(conf)).exists() {
            tracing::debug!(interface = %conf, "gone; its rp_filter is not restored");
            continue;
        }
        sysctl(&key(conf), &value.to_string())?;
        tracing::info!(conf = %conf, rp_filter = value, "rp_filter restored");
    }
    match fs::remove_dir_all(&record.dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(Error::io(format!("removing {}", record.dir.display()), e))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_value_recorded_stays() {
        let dir = tempfile::tempdir().unwrap();
        let record = Record::in_bpffs(dir.path());
        assert!(record.entries().unwrap().is_empty());
        record.remember("eth0", 1).unwrap();
        record.remember("all", 2).unwrap();
        // A restarted shim finds what it relaxed: that must not replace the node's value.
        record.remember("eth0", 2).unwrap();
        record.remember("all", 0).unwrap();
        assert_eq!(
            record.entries().unwrap(),
            [("all".to_owned(), 2), ("eth0".to_owned(), 1)]
        );
        std::os::unix::fs::symlink("strict", dir.path().join(RECORD_DIR).join("lo")).unwrap();
        assert_eq!(record.entries().unwrap().len(), 2, "a foreign entry is ignored");
    }
}
