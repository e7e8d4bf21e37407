//! Blocking netlink requests, and the policy-routing objects Sluice keeps (fwmark rules, routes)
//! as typed values read and written through them.
//!
//! The agent's ticks are synchronous (on Tokio's blocking pool) and the kernel answers these
//! requests at once, so a plain socket per request batch is all it takes: no async handle, no
//! `ip` subprocess. Only the notifications that wake the loop ([`crate::netdev::LinkEvents`])
//! are read asynchronously.

use std::{
    fmt::Debug,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
    time::Duration,
};

use ipnet::{IpNet, Ipv4Net};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{
        RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
    rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols};

/// A dump whose objects changed while the kernel was sending it is retried this many times.
const DUMP_TRIES: usize = 3;

/// Large enough for any single datagram the kernel sends in answer to a request (dumps are split
/// into datagrams of at most 32 KiB).
const RECEIVE_BUFFER: usize = 64 * 1024;

/// A netlink socket bound to the kernel.
pub struct Netlink {
    socket: Socket,
    sequence: u32,
}

impl Netlink {
    /// A `NETLINK_ROUTE` socket whose dumps the kernel filters by what the request names
    /// (`NETLINK_GET_STRICT_CHK`: a route dump naming a table returns that table only).
    pub fn route() -> io::Result<Self> {
        let nl = Self::open(protocols::NETLINK_ROUTE)?;
        nl.socket.set_netlink_get_strict_chk(true)?;
        Ok(nl)
    }

    /// A `NETLINK_NETFILTER` socket (nftables).
    pub fn netfilter() -> io::Result<Self> {
        Self::open(protocols::NETLINK_NETFILTER)
    }

    fn open(protocol: isize) -> io::Result<Self> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // The kernel answers at once; a bound on the wait keeps a wedged kernel from stalling the
        // agent loop forever.
        let timeout = nix::sys::time::TimeVal::from(libc::timeval {
            tv_sec: Duration::from_secs(5).as_secs() as libc::time_t,
            tv_usec: 0,
        });
        nix::sys::socket::setsockopt(
            &socket.as_fd(),
            nix::sys::socket::sockopt::ReceiveTimeout,
            &timeout,
        )
        .map_err(io::Error::from)?;
        Ok(Netlink { socket, sequence: 0 })
    }

    /// Sends `message` and returns the kernel's answers: every object of a dump (`NLM_F_DUMP` in
    /// `flags`), or the reply of a request, which is always acknowledged (an error becomes `Err`).
    pub fn request<T>(&mut self, message: T, flags: u16) -> io::Result<Vec<T>>
    where
        T: NetlinkSerializable + NetlinkDeserializable + Clone + Debug,
    {
        for _ in 0..DUMP_TRIES {
            if let Some(answers) = self.request_once(message.clone(), flags)? {
                return Ok(answers);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "the netlink dump kept changing while it was read",
        ))
    }

    /// `None` when a dump was interrupted by a concurrent change (`NLM_F_DUMP_INTR`).
    fn request_once<T>(&mut self, message: T, flags: u16) -> io::Result<Option<Vec<T>>>
    where
        T: NetlinkSerializable + NetlinkDeserializable + Debug,
    {
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = sequence;
        let mut request = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;

        let mut answers = Vec::new();
        let mut interrupted = false;
        let mut buffer = Vec::with_capacity(RECEIVE_BUFFER);
        loop {
            buffer.clear();
            let size = self.socket.recv(&mut buffer, libc::MSG_TRUNC)?;
            if size > buffer.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("netlink datagram of {size} bytes truncated"),
                ));
            }
            let mut datagram = &buffer[..];
            while !datagram.is_empty() {
                let answer = NetlinkMessage::<T>::deserialize(datagram)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let length = (answer.header.length as usize).next_multiple_of(4);
                datagram = datagram.get(length.max(1)..).unwrap_or_default();
                if answer.header.sequence_number != sequence {
                    continue;
                }
                interrupted |= answer.header.flags & NLM_F_DUMP_INTR != 0;
                match answer.payload {
                    NetlinkPayload::InnerMessage(m) => answers.push(m),
                    // A dump that failed says so in its closing message.
                    NetlinkPayload::Done(d) if d.code < 0 => {
                        return Err(io::Error::from_raw_os_error(-d.code));
                    }
                    NetlinkPayload::Done(_) => return Ok((!interrupted).then_some(answers)),
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    // The acknowledgement closes a request that is not a dump.
                    NetlinkPayload::Error(_) if flags & NLM_F_DUMP != NLM_F_DUMP => return Ok(Some(answers)),
                    _ => {}
                }
            }
        }
    }

    /// Sends `messages` (each with its own flags) in one datagram, as nfnetlink wants a batch,
    /// and waits for the acknowledgement of each one sent with `NLM_F_ACK`. The first error
    /// the kernel reports for any of them is returned.
    pub fn batch<T>(&mut self, messages: Vec<(T, u16)>) -> io::Result<()>
    where
        T: NetlinkSerializable + NetlinkDeserializable + Debug,
    {
        let count = messages.len() as u32;
        let first = self.sequence.wrapping_add(1);
        let (bytes, mut awaited) = encode_batch(messages, first);
        self.sequence = self.sequence.wrapping_add(count);
        let sent: Vec<u32> = (0..count).map(|i| first.wrapping_add(i)).collect();
        self.socket.send(&bytes, 0)?;
        let mut buffer = Vec::with_capacity(RECEIVE_BUFFER);
        while !awaited.is_empty() {
            buffer.clear();
            self.socket.recv(&mut buffer, 0)?;
            let mut datagram = &buffer[..];
            while !datagram.is_empty() {
                let answer = NetlinkMessage::<T>::deserialize(datagram)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let length = (answer.header.length as usize).next_multiple_of(4);
                datagram = datagram.get(length.max(1)..).unwrap_or_default();
                let sequence = answer.header.sequence_number;
                if !sent.contains(&sequence) {
                    continue;
                }
                if let NetlinkPayload::Error(e) = answer.payload {
                    if e.code.is_some() {
                        return Err(e.to_io());
                    }
                    awaited.retain(|s| *s != sequence);
                }
            }
        }
        Ok(())
    }
}

/// `messages` laid out as one datagram, numbered from `first`, each starting on a 4-byte boundary
/// (`NLMSG_ALIGN`); and the sequence numbers of those asking for an acknowledgement.
pub(crate) fn encode_batch<T: NetlinkSerializable + Debug>(
    messages: Vec<(T, u16)>,
    first: u32,
) -> (Vec<u8>, Vec<u32>) {
    let mut bytes = Vec::new();
    let mut awaited = Vec::new();
    for (sequence, (message, flags)) in (0..).map(|i| first.wrapping_add(i)).zip(messages) {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = sequence;
        if flags & NLM_F_ACK != 0 {
            awaited.push(sequence);
        }
        let mut request = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        request.finalize();
        let (start, length) = (bytes.len(), request.buffer_len());
        bytes.resize(start + length.next_multiple_of(4), 0);
        request.serialize(&mut bytes[start..start + length]);
    }
    (bytes, awaited)
}

/// The address family of a rule or route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn address_family(self) -> AddressFamily {
        match self {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        }
    }
}

/// What a rule selects by: its preference and packet mark; what it does: look up `table`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FwmarkRule {
    pub pref: u32,
    pub mark: u32,
    pub mask: u32,
    pub table: u32,
}

impl FwmarkRule {
    /// The rule of `message`, when it is a `fwmark ... lookup` rule of `family` selecting on
    /// nothing else.
    fn from_message(message: &RuleMessage, family: Family) -> Option<Self> {
        let h = &message.header;
        if h.family != family.address_family()
            || h.action != RuleAction::ToTable
            || h.src_len != 0
            || h.dst_len != 0
            || h.tos != 0
            || h.flags.contains(RuleFlags::Invert)
        {
            return None;
        }
        let (mut pref, mut mark, mut mask, mut table) = (0, None, u32::MAX, u32::from(h.table));
        for a in &message.attributes {
            match a {
                RuleAttribute::Priority(p) => pref = *p,
                RuleAttribute::FwMark(m) => mark = Some(*m),
                RuleAttribute::FwMask(m) => mask = *m,
                RuleAttribute::Table(t) => table = *t,
                RuleAttribute::Iifname(_)
                | RuleAttribute::Oifname(_)
                | RuleAttribute::Source(_)
                | RuleAttribute::Destination(_)
                | RuleAttribute::Goto(_)
                | RuleAttribute::UidRange(_)
                | RuleAttribute::IpProtocol(_)
                | RuleAttribute::SourcePortRange(_)
                | RuleAttribute::DestinationPortRange(_) => return None,
                // The kernel reports these unset (all ones) on every rule.
                RuleAttribute::SuppressPrefixLen(v) | RuleAttribute::SuppressIfGroup(v) if *v != u32::MAX => {
                    return None;
                }
                _ => {}
            }
        }
        Some(FwmarkRule {
            pref,
            mark: mark?,
            mask,
            table,
        })
    }

    fn to_message(self, family: Family) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header.family = family.address_family();
        m.header.action = RuleAction::ToTable;
        // Tables past 255 only fit the attribute; the header says "see the attribute" (0).
        m.header.table = u8::try_from(self.table).unwrap_or(0);
        m.attributes = vec![
            RuleAttribute::Priority(self.pref),
            RuleAttribute::FwMark(self.mark),
            RuleAttribute::FwMask(self.mask),
            RuleAttribute::Table(self.table),
        ];
        m
    }
}

/// Every IPv4 fwmark rule in place (rules selecting on anything else are left out).
pub fn fwmark_rules(nl: &mut Netlink) -> io::Result<Vec<FwmarkRule>> {
    fwmark_rules_of(nl, Family::V4)
}

/// Every fwmark rule of `family` in place.
pub fn fwmark_rules_of(nl: &mut Netlink, family: Family) -> io::Result<Vec<FwmarkRule>> {
    let mut request = RuleMessage::default();
    request.header.family = family.address_family();
    Ok(nl
        .request(RouteNetlinkMessage::GetRule(request), NLM_F_DUMP)?
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRule(r) => FwmarkRule::from_message(r, family),
            _ => None,
        })
        .collect())
}

/// Adds IPv4 `rule`; one already there is fine.
pub fn add_rule(nl: &mut Netlink, rule: FwmarkRule) -> io::Result<()> {
    add_rule_of(nl, rule, Family::V4)
}

/// Adds `rule` of `family`; one already there is fine.
pub fn add_rule_of(nl: &mut Netlink, rule: FwmarkRule, family: Family) -> io::Result<()> {
    match nl.request(
        RouteNetlinkMessage::NewRule(rule.to_message(family)),
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r.map(drop),
    }
}

/// Deletes IPv4 `rule`; one already gone is fine.
pub fn delete_rule(nl: &mut Netlink, rule: FwmarkRule) -> io::Result<()> {
    delete_rule_of(nl, rule, Family::V4)
}

/// Deletes `rule` of `family`; one already gone is fine.
pub fn delete_rule_of(nl: &mut Netlink, rule: FwmarkRule, family: Family) -> io::Result<()> {
    match nl.request(RouteNetlinkMessage::DelRule(rule.to_message(family)), 0) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r.map(drop),
    }
}

/// The output interfaces of `table`'s IPv6 unicast routes, with their prefix lengths.
pub fn routes_v6(nl: &mut Netlink, table: u32) -> io::Result<Vec<(u8, Option<u32>)>> {
    Ok(dump_table(nl, table, Family::V6)?
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => Some(r),
            _ => None,
        })
        .filter(|r| r.header.address_family == AddressFamily::Inet6 && r.header.kind == RouteType::Unicast)
        .filter_map(|r| {
            let mut t = u32::from(r.header.table);
            let mut oif = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Table(x) => t = *x,
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            (t == table).then_some((r.header.destination_prefix_length, oif))
        })
        .collect())
}

/// The IPv6 route `default dev <oif>` in `table`, as a message.
fn default_v6_via_device(table: u32, oif: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header = route_header(table);
    m.header.address_family = AddressFamily::Inet6;
    m.header.protocol = RouteProtocol::Boot;
    m.header.scope = RouteScope::Universe;
    m.header.kind = RouteType::Unicast;
    m.attributes.push(RouteAttribute::Table(table));
    m.attributes.push(RouteAttribute::Oif(oif));
    m
}

/// Puts `default dev <oif>` into `table` (IPv6), replacing the default route there.
pub fn replace_default_v6(nl: &mut Netlink, table: u32, oif: u32) -> io::Result<()> {
    nl.request(
        RouteNetlinkMessage::NewRoute(default_v6_via_device(table, oif)),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
    .map(drop)
}

/// Deletes every IPv6 route of `table`.
pub fn flush_table_v6(nl: &mut Netlink, table: u32) -> io::Result<()> {
    for (prefix_len, oif) in routes_v6(nl, table)? {
        let mut m = RouteMessage::default();
        m.header = route_header(table);
        m.header.address_family = AddressFamily::Inet6;
        m.header.destination_prefix_length = prefix_len;
        m.attributes.push(RouteAttribute::Table(table));
        if let Some(oif) = oif {
            m.attributes.push(RouteAttribute::Oif(oif));
        }
        match nl.request(RouteNetlinkMessage::DelRoute(m), 0) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH | libc::ENOENT)) => {}
            r => r.map(drop)?,
        }
    }
    Ok(())
}

/// A plain IPv4 unicast route through one device, with what `ip route` shows of it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub destination: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: u32,
    pub protocol: u8,
    pub scope: u8,
    pub prefsrc: Option<IpAddr>,
    pub metric: Option<u32>,
    pub onlink: bool,
}

impl Route {
    /// `default dev <ifindex>`, as `ip route add default dev X` makes it.
    pub fn default_via_device(oif: u32) -> Self {
        Route {
            destination: IpNet::V4(Ipv4Net::default()),
            gateway: None,
            oif,
            protocol: RouteProtocol::Boot.into(),
            scope: RouteScope::Link.into(),
            prefsrc: None,
            metric: None,
            onlink: false,
        }
    }

    /// The table and route of `message`, when it is a unicast route (either family) through
    /// one device (multipath and special routes are not Sluice's business).
    fn from_message(message: &RouteMessage) -> Option<(u32, Self)> {
        let h = &message.header;
        let unspecified = match h.address_family {
            AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            _ => return None,
        };
        if h.kind != RouteType::Unicast {
            return None;
        }
        // An address of the message's own family, or none.
        let ip = |a: &RouteAddress| {
            let ip = match a {
                RouteAddress::Inet(ip) => IpAddr::V4(*ip),
                RouteAddress::Inet6(ip) => IpAddr::V6(*ip),
                _ => return None,
            };
            (ip.is_ipv4() == unspecified.is_ipv4()).then_some(ip)
        };
        let mut table = u32::from(h.table);
        let (mut destination, mut gateway, mut oif, mut prefsrc, mut metric) =
            (unspecified, None, None, None, None);
        for a in &message.attributes {
            match a {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Destination(d) => destination = ip(d)?,
                RouteAttribute::Gateway(g) => gateway = Some(ip(g)?),
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::PrefSource(s) => prefsrc = Some(ip(s)?),
                RouteAttribute::Priority(p) => metric = Some(*p),
                RouteAttribute::MultiPath(_) => return None,
                _ => {}
            }
        }
        Some((
            table,
            Route {
                destination: IpNet::new(destination, h.destination_prefix_length).ok()?,
                gateway,
                oif: oif?,
                protocol: h.protocol.into(),
                scope: h.scope.into(),
                prefsrc,
                metric,
                onlink: h.flags.contains(RouteFlags::Onlink),
            },
        ))
    }

    fn to_message(&self, table: u32) -> RouteMessage {
        let address = |ip: IpAddr| match ip {
            IpAddr::V4(ip) => RouteAddress::Inet(ip),
            IpAddr::V6(ip) => RouteAddress::Inet6(ip),
        };
        let mut m = RouteMessage::default();
        m.header = route_header(table);
        if self.destination.addr().is_ipv6() {
            m.header.address_family = AddressFamily::Inet6;
        }
        m.header.destination_prefix_length = self.destination.prefix_len();
        m.header.protocol = RouteProtocol::from(self.protocol);
        m.header.scope = RouteScope::from(self.scope);
        m.header.kind = RouteType::Unicast;
        if self.onlink {
            m.header.flags = RouteFlags::Onlink;
        }
        m.attributes.push(RouteAttribute::Table(table));
        if self.destination.prefix_len() > 0 {
            m.attributes
                .push(RouteAttribute::Destination(address(self.destination.addr())));
        }
        if let Some(g) = self.gateway {
            m.attributes.push(RouteAttribute::Gateway(address(g)));
        }
        m.attributes.push(RouteAttribute::Oif(self.oif));
        if let Some(s) = self.prefsrc {
            m.attributes.push(RouteAttribute::PrefSource(address(s)));
        }
        if let Some(p) = self.metric {
            m.attributes.push(RouteAttribute::Priority(p));
        }
        m
    }
}

fn route_header(table: u32) -> RouteHeader {
    RouteHeader {
        address_family: AddressFamily::Inet,
        // Tables past 255 only fit the attribute; the header says "see the attribute" (0).
        table: u8::try_from(table).unwrap_or(0),
        ..Default::default()
    }
}

/// What a dump of `table`'s routes of `family` answers (nothing when the table does not exist).
fn dump_table(nl: &mut Netlink, table: u32, family: Family) -> io::Result<Vec<RouteNetlinkMessage>> {
    let mut request = RouteMessage::default();
    request.header = route_header(table);
    request.header.address_family = family.address_family();
    request.attributes.push(RouteAttribute::Table(table));
    match nl.request(RouteNetlinkMessage::GetRoute(request), NLM_F_DUMP) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Vec::new()),
        r => r,
    }
}

/// The main routing table.
pub const MAIN_TABLE: u32 = RouteHeader::RT_TABLE_MAIN as u32;

/// The plain unicast IPv4 routes of `table` (none when the table does not exist).
pub fn routes(nl: &mut Netlink, table: u32) -> io::Result<Vec<Route>> {
    routes_of(nl, table, Family::V4)
}

/// The plain unicast routes of `family` in `table` (none when the table does not exist).
pub fn routes_of(nl: &mut Netlink, table: u32, family: Family) -> io::Result<Vec<Route>> {
    let v6 = family == Family::V6;
    Ok(dump_table(nl, table, family)?
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => Route::from_message(r),
            _ => None,
        })
        // Strict checking filters by table, but a kernel without it sends every table.
        .filter_map(|(t, r)| (t == table && r.destination.addr().is_ipv6() == v6).then_some(r))
        .collect())
}

/// The output interface of the main table's IPv4 default route with the lowest metric (of a
/// multipath one, its first next hop's), if there is one.
pub fn default_route_oif(nl: &mut Netlink) -> io::Result<Option<u32>> {
    let mut request = RouteMessage::default();
    request.header = route_header(MAIN_TABLE);
    request.attributes.push(RouteAttribute::Table(MAIN_TABLE));
    Ok(nl
        .request(RouteNetlinkMessage::GetRoute(request), NLM_F_DUMP)?
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => default_route(r),
            _ => None,
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, oif)| oif))
}

/// The (metric, output interface) of `message` when it is a unicast IPv4 default route of the
/// main table.
fn default_route(message: &RouteMessage) -> Option<(u32, u32)> {
    let h = &message.header;
    if h.address_family != AddressFamily::Inet
        || h.kind != RouteType::Unicast
        || h.destination_prefix_length != 0
    {
        return None;
    }
    let (mut table, mut metric, mut oif) = (u32::from(h.table), 0, None);
    for a in &message.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::MultiPath(hops) => oif = oif.or(hops.first().map(|h| h.interface_index)),
            _ => {}
        }
    }
    (table == MAIN_TABLE).then_some((metric, oif?))
}

/// Adds `route` to `table`, replacing the route to the same destination and metric.
pub fn replace_route(nl: &mut Netlink, table: u32, route: &Route) -> io::Result<()> {
    nl.request(
        RouteNetlinkMessage::NewRoute(route.to_message(table)),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
    .map(drop)
}

/// Deletes `route` from `table`; one already gone is fine.
pub fn delete_route(nl: &mut Netlink, table: u32, route: &Route) -> io::Result<()> {
    match nl.request(RouteNetlinkMessage::DelRoute(route.to_message(table)), 0) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH | libc::ENOENT)) => Ok(()),
        r => r.map(drop),
    }
}

/// Empties `table`.
pub fn flush_table(nl: &mut Netlink, table: u32) -> io::Result<()> {
    for route in routes(nl, table)? {
        delete_route(nl, table, &route)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_survive_the_trip_through_a_netlink_message() {
        let route = Route {
            destination: "198.18.0.0/24".parse().unwrap(),
            gateway: Some("198.18.0.1".parse().unwrap()),
            oif: 7,
            protocol: RouteProtocol::Kernel.into(),
            scope: RouteScope::Universe.into(),
            prefsrc: Some("198.18.0.11".parse().unwrap()),
            metric: Some(100),
            onlink: true,
        };
        let m = route.to_message(8481);
        assert_eq!(Route::from_message(&m), Some((8481, route.clone())));
        let default = Route::default_via_device(3);
        assert_eq!(
            Route::from_message(&default.to_message(8473)),
            Some((8473, default.clone()))
        );

        let v6 = Route {
            destination: "::/0".parse().unwrap(),
            gateway: Some("fe80::1".parse().unwrap()),
            prefsrc: None,
            onlink: false,
            ..route.clone()
        };
        let m = v6.to_message(8481);
        assert_eq!(m.header.address_family, AddressFamily::Inet6);
        assert_eq!(Route::from_message(&m), Some((8481, v6)), "IPv6 too");
        let mut mixed = route.to_message(8481);
        mixed.header.address_family = AddressFamily::Inet6;
        assert_eq!(
            Route::from_message(&mixed),
            None,
            "IPv4 addresses in an IPv6 route"
        );

        let mut multipath = RouteMessage::default();
        multipath.header = route_header(MAIN_TABLE);
        multipath.header.kind = RouteType::Unicast;
        multipath.attributes.push(RouteAttribute::MultiPath(vec![]));
        assert_eq!(Route::from_message(&multipath), None, "multipath is not copied");
        let mut blackhole = default.to_message(MAIN_TABLE);
        blackhole.header.kind = RouteType::BlackHole;
        assert_eq!(Route::from_message(&blackhole), None);
    }

    #[test]
    fn the_default_route_is_the_main_tables_unicast_one() {
        let mut via_eth0 = Route::default_via_device(2).to_message(MAIN_TABLE);
        via_eth0.attributes.push(RouteAttribute::Priority(100));
        assert_eq!(default_route(&via_eth0), Some((100, 2)));
        assert_eq!(
            default_route(&Route::default_via_device(3).to_message(8473)),
            None,
            "another table's default is not the node's"
        );
        let subnet = Route {
            destination: "192.0.2.0/24".parse().unwrap(),
            ..Route::default_via_device(2)
        };
        assert_eq!(default_route(&subnet.to_message(MAIN_TABLE)), None);
        let mut unreachable = Route::default_via_device(2).to_message(MAIN_TABLE);
        unreachable.header.kind = RouteType::Unreachable;
        assert_eq!(default_route(&unreachable), None);
        let mut multipath = RouteMessage::default();
        multipath.header = route_header(MAIN_TABLE);
        multipath.header.kind = RouteType::Unicast;
        let hop = |interface_index| {
            let mut hop = netlink_packet_route::route::RouteNextHop::default();
            hop.interface_index = interface_index;
            hop
        };
        multipath
            .attributes
            .push(RouteAttribute::MultiPath(vec![hop(5), hop(6)]));
        assert_eq!(default_route(&multipath), Some((0, 5)), "its first next hop");
    }

    #[test]
    fn rules_survive_the_trip_through_a_netlink_message() {
        let rule = FwmarkRule {
            pref: 8474,
            mark: 0x5c10_0003,
            mask: 0xfff4_ffff,
            table: 8480,
        };
        assert_eq!(
            FwmarkRule::from_message(&rule.to_message(Family::V4), Family::V4),
            Some(rule)
        );
        let mut as_dumped = rule.to_message(Family::V4);
        as_dumped.header.table = 252;
        as_dumped
            .attributes
            .push(RuleAttribute::SuppressPrefixLen(u32::MAX));
        assert_eq!(
            FwmarkRule::from_message(&as_dumped, Family::V4),
            Some(rule),
            "as the kernel reports it"
        );
        let mut from_source = rule.to_message(Family::V4);
        from_source.header.src_len = 24;
        assert_eq!(
            FwmarkRule::from_message(&from_source, Family::V4),
            None,
            "a rule that also selects on something else is another rule"
        );
        let mut no_mark = rule.to_message(Family::V4);
        no_mark
            .attributes
            .retain(|a| !matches!(a, RuleAttribute::FwMark(_)));
        assert_eq!(FwmarkRule::from_message(&no_mark, Family::V4), None);
        // The IPv6 twin of the rule is another family's rule.
        let v6 = rule.to_message(Family::V6);
        assert_eq!(FwmarkRule::from_message(&v6, Family::V6), Some(rule));
        assert_eq!(FwmarkRule::from_message(&v6, Family::V4), None);
    }
}
