//! This node's interfaces: discovery, pod-interface patterns, Sluice's tunnel device, sysctls.
//!
//! Device and address changes are followed by rescanning (`/sys/class/net` and getifaddrs): on
//! every netlink link/address notification ([`LinkEvents`]), and on every tick as a backstop.

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::Command,
};

use crate::{
    desired::Interface,
    error::{Error, Result},
};

/// Default pod-interface patterns, covering common CNIs.
pub const DEFAULT_POD_INTERFACES: &[&str] =
    &["veth*", "cali*", "lxc*", "cni*", "eni*", "gke*", "azv*", "vnet*"];

/// Every interface with its IPv4 addresses.
pub fn interfaces() -> Result<Vec<Interface>> {
    let mut by_name: BTreeMap<String, Interface> = BTreeMap::new();
    let dir = fs::read_dir("/sys/class/net").map_err(|e| Error::io("listing /sys/class/net", e))?;
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(index) = ifindex(&name) else { continue };
        by_name.insert(
            name.clone(),
            Interface {
                name,
                index,
                ipv4: Vec::new(),
            },
        );
    }
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| Error::io("getifaddrs", e.into()))?;
    for addr in addrs {
        let Some(ip) = addr
            .address
            .as_ref()
            .and_then(|a| a.as_sockaddr_in())
            .map(|s| s.ip())
        else {
            continue;
        };
        if let Some(i) = by_name.get_mut(&addr.interface_name) {
            i.ipv4.push(ip);
        }
    }
    Ok(by_name.into_values().collect())
}

/// The index of interface `name`, if it exists.
pub fn ifindex(name: &str) -> Option<u32> {
    fs::read_to_string(Path::new("/sys/class/net").join(name).join("ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The MTU of the interface of `interfaces` holding `address` (the underlay interface, for the
/// node IP).
pub fn mtu_of_address(interfaces: &[Interface], address: Ipv4Addr) -> Option<u32> {
    let interface = interfaces.iter().find(|i| i.ipv4.contains(&address))?;
    fs::read_to_string(Path::new("/sys/class/net").join(&interface.name).join("mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Packets interface `name` has received (for a pod's host-side veth: what the pod sent).
pub fn rx_packets(name: &str) -> Option<u64> {
    fs::read_to_string(
        Path::new("/sys/class/net")
            .join(name)
            .join("statistics/rx_packets"),
    )
    .ok()?
    .trim()
    .parse()
    .ok()
}

/// The ifindex of the device `name` is enslaved to (a bridge, for bridged pod interfaces).
pub fn master_ifindex(name: &str) -> Option<u32> {
    let master = fs::read_link(Path::new("/sys/class/net").join(name).join("master")).ok()?;
    ifindex(master.file_name()?.to_str()?)
}

/// The interface of the IPv4 default route (main table), if any.
pub fn default_route_interface() -> Option<String> {
    let table = fs::read_to_string("/proc/net/route").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_owned())
    })
}

/// Netlink notifications of link, IPv4 address and IPv4 route changes; their content is not
/// parsed, any message just means "rescan now".
pub struct LinkEvents {
    fd: std::os::fd::OwnedFd,
}

impl LinkEvents {
    /// Subscribes to `RTMGRP_LINK`, `RTMGRP_IPV4_IFADDR` and `RTMGRP_IPV4_ROUTE`.
    pub fn open() -> Result<Self> {
        use nix::sys::socket::{AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket};
        use std::os::fd::AsRawFd;
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkRoute,
        )
        .map_err(|e| Error::io("opening a netlink socket", e.into()))?;
        let groups = (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV4_ROUTE) as u32;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))
            .map_err(|e| Error::io("subscribing to netlink link events", e.into()))?;
        Ok(LinkEvents { fd })
    }

    /// Waits up to `timeout` for a notification; true when one came (all pending ones are read).
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        use nix::{
            poll::{PollFd, PollFlags, PollTimeout, poll},
            sys::socket::{MsgFlags, recv},
        };
        use std::os::fd::{AsFd, AsRawFd};
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut fds, timeout), Ok(n) if n > 0) {
            return false;
        }
        let mut buf = [0u8; 8192];
        // Bounded: the socket is non-blocking and the kernel queue is finite.
        for _ in 0..1024 {
            match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) if n > 0 => continue,
                // ENOBUFS (missed notifications) also just means "rescan".
                _ => break,
            }
        }
        true
    }
}

/// Shell-style glob with `*` and `?`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Whether `name` is a pod-facing interface by `patterns`.
pub fn is_pod_interface(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| glob_match(p, name))
}

/// Settings of Sluice's own tunnel device.
#[derive(Clone, Debug)]
pub struct Tunnel {
    pub device: String,
    pub port: u16,
    pub vni: u32,
    /// Underlay source address of the outer packets; the kernel picks one when `None`.
    pub local: Option<Ipv4Addr>,
}

/// Makes sure the collect_md VXLAN device exists as configured and is up; returns its ifindex.
/// A device of that name with other settings is replaced (it is Sluice's own).
pub fn ensure_tunnel(t: &Tunnel) -> Result<u32> {
    if ifindex(&t.device).is_some() && !tunnel_matches(t)? {
        tracing::warn!(device = %t.device, "tunnel device has other settings; recreating it");
        ip(&["link", "del", &t.device])?;
    }
    if ifindex(&t.device).is_none() {
        let port = t.port.to_string();
        let mut args = vec![
            "link",
            "add",
            t.device.as_str(),
            "type",
            "vxlan",
            "external",
            "dstport",
            &port,
        ];
        let local = t.local.map(|l| l.to_string());
        if let Some(local) = &local {
            args.extend(["local", local]);
        }
        ip(&args)?;
    }
    // No ARP on the tunnel: the datapath addresses every packet itself.
    ip(&["link", "set", &t.device, "arp", "off", "up"])?;
    sysctl(&format!("net/ipv6/conf/{}/disable_ipv6", t.device), "1").ok();
    relax_rp_filter(&t.device)?;
    ifindex(&t.device).ok_or_else(|| Error::Command {
        command: format!("ip link add {}", t.device),
        stderr: "the device is not there after creating it".into(),
    })
}

fn tunnel_matches(t: &Tunnel) -> Result<bool> {
    let out = ip(&["-d", "-j", "link", "show", "dev", &t.device])?;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let data = &v[0]["linkinfo"]["info_data"];
    Ok(v[0]["linkinfo"]["info_kind"] == "vxlan"
        && data["external"] == true
        && data["port"] == u64::from(t.port)
        && t.local.is_none_or(|l| data["local"] == l.to_string()))
}

/// Turns reverse-path filtering off on the tunnel device, keeping every other interface as it is.
///
/// Decapsulated requests come from pod IPs that the main table routes elsewhere, and the device
/// has no address, so even loose mode drops them (`__fib_validate_source`: no address, no
/// exemption). The effective setting is `max(all, device)`, so when `all` is not 0 it is lowered
/// to 0 after raising every other interface's own value to the old `all` (their behaviour is
/// unchanged), as Cilium does.
pub fn relax_rp_filter(tunnel_device: &str) -> Result<()> {
    let read = |key: &str| -> u32 {
        fs::read_to_string(proc_sys().join(key))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let all = read("net/ipv4/conf/all/rp_filter");
    if all != 0 {
        for entry in fs::read_dir(proc_sys().join("net/ipv4/conf"))
            .map_err(|e| Error::io("listing ipv4 conf", e))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "all" || name == tunnel_device {
                continue;
            }
            let key = format!("net/ipv4/conf/{name}/rp_filter");
            if read(&key) < all {
                sysctl(&key, &all.to_string())?;
            }
        }
        sysctl("net/ipv4/conf/all/rp_filter", "0")?;
    }
    sysctl(&format!("net/ipv4/conf/{tunnel_device}/rp_filter"), "0")
}

/// Strict reverse-path filtering (1) on an egress interface becomes loose (2): replies to the
/// egress IP may arrive on an interface that is not the route back to their source. Off (0) and
/// loose stay as they are.
pub fn loosen_rp_filter(interface: &str) -> Result<()> {
    let key = format!("net/ipv4/conf/{interface}/rp_filter");
    let current = fs::read_to_string(proc_sys().join(&key)).unwrap_or_default();
    if current.trim() == "1" {
        sysctl(&key, "2")?;
    }
    Ok(())
}

/// Where the network sysctls are read and written: `/proc/sys`, or `$SLUICE_PROC_SYS_DIR` when set.
/// A container that is not privileged sees `/proc/sys` read-only and cannot have a writable mount
/// on top of it, so the Helm chart mounts the host's `/proc/sys/net` at `/host/proc/sys/net` and
/// sets `SLUICE_PROC_SYS_DIR=/host/proc/sys` (with host networking it is the same network namespace).
pub fn proc_sys() -> std::path::PathBuf {
    std::env::var_os("SLUICE_PROC_SYS_DIR").map_or_else(|| "/proc/sys".into(), Into::into)
}

/// Writes `<proc_sys()>/<key>`.
pub fn sysctl(key: &str, value: &str) -> Result<()> {
    let path = proc_sys().join(key);
    fs::write(&path, value).map_err(|e| Error::io(format!("writing {} = {value}", path.display()), e))
}

/// Runs `ip ARGS`, returning stdout.
pub fn ip(args: &[&str]) -> Result<String> {
    run("ip", args, None)
}

/// Runs a command, feeding it `stdin`, returning stdout or an error with its stderr.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(format!("running `{command}` (is {program} installed?)"), e))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| Error::io(format!("writing to `{command}`"), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io(format!("running `{command}`"), e))?;
    if !out.status.success() {
        return Err(Error::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An IPv4 address of `ip`, if it is one.
pub fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_the_shell() {
        let patterns: Vec<String> = DEFAULT_POD_INTERFACES.iter().map(|s| s.to_string()).collect();
        for name in ["veth1234", "cali0a1b", "lxc_health", "cni0", "eni3f", "gke12"] {
            assert!(is_pod_interface(&patterns, name), "{name}");
        }
        for name in ["eth0", "lo", "sluice-vx0", "flannel.1", "vxlan.calico"] {
            assert!(!is_pod_interface(&patterns, name), "{name}");
        }
        assert!(glob_match("a*b?c", "aXXbYc"));
        assert!(!glob_match("a*b?c", "aXXbc"));
        assert!(glob_match("*", ""));
    }
}
