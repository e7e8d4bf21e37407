//! Hand-made packets for hostile-input tests: an IPv4/UDP datagram with any source address sent
//! through a raw socket, and VXLAN frames carrying any inner packet, sent as ordinary UDP so the
//! outer source is whatever the sender's network makes of it (a pod's is masqueraded to its node's
//! address by the testbed's CNI, as by many real ones).

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, sendto, socket,
};

use crate::in_netns;

/// The Internet checksum (RFC 1071) of `bytes`.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet (20-byte header, DF clear, TTL 64) holding a UDP datagram with no checksum.
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// A VXLAN payload (RFC 7348 header with VNI `vni`) carrying `inner` (an IPv4 packet) in an
/// Ethernet frame with made-up addresses, as a VXLAN device receives it.
pub fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + 14 + inner.len());
    p.extend_from_slice(&[0x08, 0, 0, 0]);
    p.extend_from_slice(&(vni << 8).to_be_bytes());
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00]);
    p.extend_from_slice(inner);
    p
}

/// Sends the IPv4 packet `packet` (its header included, source address as written) from network
/// namespace `ns`, `count` times.
pub fn send_raw(ns: &str, packet: &[u8], count: usize) -> Result<()> {
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    in_netns(ns, || -> Result<()> {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Raw,
        )
        .context("a raw socket")?;
        let to = SockaddrIn::from(SocketAddrV4::new(dst, 0));
        for _ in 0..count {
            sendto(fd.as_raw_fd(), packet, &to, MsgFlags::empty()).context("sending a raw packet")?;
        }
        Ok(())
    })
}

/// Sends `payload` as UDP datagrams to `to` from network namespace `ns`, `count` times.
pub fn send_udp(ns: &str, to: SocketAddrV4, payload: &[u8], count: usize) -> Result<()> {
    in_netns(ns, || -> Result<()> {
        let socket = UdpSocket::bind("0.0.0.0:0").context("binding a UDP socket")?;
        for _ in 0..count {
            socket
                .send_to(payload, to)
                .with_context(|| format!("sending to {to}"))?;
        }
        Ok(())
    })
}

/// A UDP socket bound in network namespace `ns`, collecting what arrives.
pub struct Listener(UdpSocket);

impl Listener {
    /// Binds `0.0.0.0:port` in `ns`.
    pub fn bind(ns: &str, port: u16) -> Result<Listener> {
        in_netns(ns, || UdpSocket::bind(("0.0.0.0", port)))
            .map(Listener)
            .with_context(|| format!("binding UDP port {port} in {ns}"))
    }

    /// The (source, payload) of every datagram that arrives within `window`.
    pub fn collect(&self, window: Duration) -> Vec<(std::net::SocketAddr, Vec<u8>)> {
        let end = Instant::now() + window;
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return out;
            }
            self.0.set_read_timeout(Some(left)).expect("a read timeout");
            match self.0.recv_from(&mut buf) {
                Ok((n, from)) => out.push((from, buf[..n].to_vec())),
                Err(_) => return out,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_carry_valid_checksums_and_lengths() {
        let p = ipv4_udp(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            1,
            2,
            b"abc",
        );
        assert_eq!(p.len(), 31);
        assert_eq!(checksum(&p[..20]), 0, "a header with its checksum sums to zero");
        assert_eq!(u16::from_be_bytes([p[24], p[25]]), 11);
        let v = vxlan(8473, &p);
        assert_eq!(&v[4..7], &[0x00, 0x21, 0x19]);
        assert_eq!(&v[20..22], &[0x08, 0x00]);
    }
}
