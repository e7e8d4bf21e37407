//! `sluice-shim uninstall`: take Sluice off a node.

use std::{fs, io, path::Path};

use crate::{
    error::{Error, Result},
    netdev,
};

/// Removes, in this order: the managed egress IPs Sluice added (every address with its mark: a
/// node without the fence would otherwise answer for them forever), the pinned links (TCX links detach when their last reference goes, so
/// the datapath stops here and traffic takes the normal path), then puts back the rp_filter
/// values the shim recorded (the record is in the bpffs directory), removes the pinned programs
/// and maps, the nftables table, the egress rules and their tables, the reply rule and route, and
/// the tunnel device. Missing pieces are fine.
pub fn uninstall(bpffs_dir: &Path, tunnel_device: &str, reply_table: u32) -> Result<()> {
    release_managed()?;
    remove_tree(&bpffs_dir.join("links"))?;
    crate::rp_filter::restore(&crate::rp_filter::Record::in_bpffs(bpffs_dir))?;
    remove_tree(bpffs_dir)?;
    crate::nat::remove_table()?;
    crate::egress_route::remove_all(reply_table)?;
    crate::nat::remove_reply_route(reply_table)?;
    netdev::delete_link(tunnel_device)
}

fn release_managed() -> Result<()> {
    crate::egress_ip::release_held()
        .map(drop)
        .map_err(|e| Error::io("releasing managed egress IPs", io::Error::other(e)))
}

fn remove_tree(dir: &Path) -> Result<()> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    remove_tree(&path)?;
                } else {
                    fs::remove_file(&path)
                        .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
                }
            }
            fs::remove_dir(dir).map_err(|e| Error::io(format!("removing {}", dir.display()), e))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("listing {}", dir.display()), e)),
    }
}
