//! Hand-made packets for hostile-input tests: an IPv4/UDP or IPv6/UDP datagram with any source
//! address sent through a raw socket, and VXLAN frames carrying any inner packet, sent as ordinary
//! UDP so the outer source is whatever the sender's network makes of it (a pod's is masqueraded to
//! its node's address by the testbed's CNI, as by many real ones).

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket},
    os::fd::{AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use nix::sys::socket::{
    AddressFamily, Backlog, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6, bind,
    listen, sendto, setsockopt, socket, sockopt,
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

/// An IPv6 packet (40-byte header, hop limit 64, no extension headers) holding a UDP datagram
/// with its checksum (mandatory over IPv6).
pub fn ipv6_udp(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut p = Vec::with_capacity(40 + udp_len);
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[17, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    // Over the pseudo-header (RFC 8200 section 8.1): addresses, length, next header.
    let mut summed = Vec::with_capacity(40 + udp_len);
    summed.extend_from_slice(&p[8..40]);
    summed.extend_from_slice(&(udp_len as u32).to_be_bytes());
    summed.extend_from_slice(&[0, 0, 0, 17]);
    summed.extend_from_slice(&p[40..]);
    // A computed 0 goes out as 0xffff: 0 means "no checksum", which IPv6 receivers drop.
    let sum = match checksum(&summed) {
        0 => 0xffff,
        s => s,
    };
    p[46..48].copy_from_slice(&sum.to_be_bytes());
    p
}

/// A VXLAN payload (RFC 7348 header with VNI `vni`) carrying `inner` (an IPv4 or IPv6 packet, the
/// EtherType follows its version) in an Ethernet frame with made-up addresses, as a VXLAN device
/// receives it.
pub fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    let ethertype: [u8; 2] = match inner.first().map(|b| b >> 4) {
        Some(6) => [0x86, 0xdd],
        _ => [0x08, 0x00],
    };
    let mut p = Vec::with_capacity(8 + 14 + inner.len());
    p.extend_from_slice(&[0x08, 0, 0, 0]);
    p.extend_from_slice(&(vni << 8).to_be_bytes());
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02]);
    p.extend_from_slice(&ethertype);
    p.extend_from_slice(inner);
    p
}

/// Sends the IPv4 or IPv6 packet `packet` (its header included, source address as written) from
/// network namespace `ns`, `count` times.
pub fn send_raw(ns: &str, packet: &[u8], count: usize) -> Result<()> {
    let to = match packet.first().map(|b| b >> 4) {
        Some(6) => {
            let dst: [u8; 16] = packet.get(24..40).context("a short IPv6 header")?.try_into()?;
            // Port 0: the socket's own protocol, IPPROTO_RAW, with which the header is the caller's.
            SocketAddr::V6(SocketAddrV6::new(dst.into(), 0, 0, 0))
        }
        _ => {
            let dst: [u8; 4] = packet.get(16..20).context("a short IPv4 header")?.try_into()?;
            SocketAddr::V4(SocketAddrV4::new(dst.into(), 0))
        }
    };
    in_netns(ns, || -> Result<()> {
        let family = match to {
            SocketAddr::V4(_) => AddressFamily::Inet,
            SocketAddr::V6(_) => AddressFamily::Inet6,
        };
        let fd = socket(family, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::Raw)
            .context("a raw socket")?;
        for _ in 0..count {
            match to {
                SocketAddr::V4(v4) => {
                    sendto(fd.as_raw_fd(), packet, &SockaddrIn::from(v4), MsgFlags::empty())
                }
                SocketAddr::V6(v6) => {
                    sendto(fd.as_raw_fd(), packet, &SockaddrIn6::from(v6), MsgFlags::empty())
                }
            }
            .context("sending a raw packet")?;
        }
        Ok(())
    })
}

/// A socket of `kind` (stream or datagram) bound to `[::]:port` for IPv6 only (listening, for a
/// stream), in the calling thread's namespace: it leaves IPv4 on `port` to a socket of its own, and
/// reports its peers' IPv6 addresses as they are (never IPv4-mapped).
pub fn v6_only_socket(kind: SockType, port: u16) -> Result<OwnedFd> {
    let fd = socket(AddressFamily::Inet6, kind, SockFlag::SOCK_CLOEXEC, None).context("an IPv6 socket")?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &true).context("IPV6_V6ONLY")?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).context("SO_REUSEADDR")?;
    let addr = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    bind(fd.as_raw_fd(), &addr).with_context(|| format!("binding [::]:{port}"))?;
    if kind == SockType::Stream {
        listen(&fd, Backlog::new(128)?).context("listening")?;
    }
    Ok(fd)
}

/// Sends `payload` as UDP datagrams to `to` (IPv4 or IPv6) from network namespace `ns`, `count`
/// times.
pub fn send_udp(ns: &str, to: impl Into<SocketAddr>, payload: &[u8], count: usize) -> Result<()> {
    send_udp_from(ns, 0, to, payload, count)
}

/// [`send_udp`] from source port `port` (0: any), so that datagrams sent by separate calls
/// belong to one flow.
pub fn send_udp_from(
    ns: &str,
    port: u16,
    to: impl Into<SocketAddr>,
    payload: &[u8],
    count: usize,
) -> Result<()> {
    let to: SocketAddr = to.into();
    in_netns(ns, || -> Result<()> {
        let any: SocketAddr = match to {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, port).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, port).into(),
        };
        let socket = UdpSocket::bind(any).context("binding a UDP socket")?;
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

    /// Binds `[::]:port` in `ns`, for IPv6 only (a [`Listener::bind`] on the same port can run
    /// beside it).
    pub fn bind_v6(ns: &str, port: u16) -> Result<Listener> {
        in_netns(ns, || v6_only_socket(SockType::Datagram, port))
            .map(|fd| Listener(fd.into()))
            .with_context(|| format!("binding UDP port {port} (IPv6) in {ns}"))
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

    #[test]
    fn ipv6_datagrams_carry_a_valid_udp_checksum() {
        let (src, dst): (Ipv6Addr, Ipv6Addr) = ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap());
        for payload in [&b"abc"[..], b"", b"abcd"] {
            let p = ipv6_udp(src, dst, 1, 2, payload);
            assert_eq!(p.len(), 48 + payload.len());
            assert_eq!(p[0] >> 4, 6);
            assert_eq!(u16::from_be_bytes([p[4], p[5]]) as usize, 8 + payload.len());
            assert_eq!(p[6], 17);
            let mut pseudo = p[8..40].to_vec();
            pseudo.extend_from_slice(&(8 + payload.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 17]);
            pseudo.extend_from_slice(&p[40..]);
            assert_eq!(checksum(&pseudo), 0, "a datagram with its checksum sums to zero");
            assert_ne!(&p[46..48], &[0, 0]);
        }
        let v = vxlan(1, &ipv6_udp(src, dst, 1, 2, b"x"));
        assert_eq!(
            &v[20..22],
            &[0x86, 0xdd],
            "an IPv6 inner packet is labelled as such"
        );
    }
}
