//! The shim's errors: the ones users hit get a sentence saying what to do.

use std::{io, net::IpAddr, path::PathBuf};

/// Everything that can go wrong in the shim.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    PlanRefused(#[from] crate::layout::MapFull),

    #[error(
        "permission denied using bpf(2) while {action}: run sluice-shim as root, or grant it \
         CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (CAP_SYS_ADMIN on kernels before 5.8)"
    )]
    NoBpfPermission {
        action: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error(
        "{path} is not on a mounted bpffs, so maps cannot be pinned and would not survive a restart: \
         mount it with `mount -t bpf bpf /sys/fs/bpf` (in Kubernetes, mount the host's /sys/fs/bpf \
         into the pod), or pick another directory with --bpffs-dir"
    )]
    BpffsNotMounted { path: PathBuf },

    #[error(
        "kernel {found} is too old: Sluice needs Linux {required} or later (TCX links that survive \
         restarts, bpf_redirect_neigh)"
    )]
    KernelTooOld { found: String, required: &'static str },

    #[error(
        "egress interface {interface:?} of policy {policy:?} does not exist on this node: fix the \
         policy's egress interface or the node selector"
    )]
    EgressInterfaceMissing { interface: String, policy: String },

    #[error(
        "egress IP {ip} of policy {policy:?} is not assigned to any interface of this node: add it \
         (e.g. `ip addr add {ip}/32 dev <interface>`) or fix the policy's egressIP"
    )]
    EgressIpNotLocal { ip: IpAddr, policy: String },

    #[error("managed egress IP {ip} of policy {policy:?} is not held by this node: {why}")]
    ManagedEgressIpNotHeld { ip: IpAddr, policy: String, why: String },

    #[error(
        "policy {policy:?} names this node as gateway but no egress IP was given and no default-route interface with an IPv4 address was found"
    )]
    NoDefaultEgressIp { policy: String },

    #[error(
        "policy {policy:?} names this node as gateway of IPv6 traffic but no IPv6 egress IP was \
         given and its egress interface has no global IPv6 address"
    )]
    NoDefaultEgressIpV6 { policy: String },

    #[error(
        "egress IP {ip} of policy {policy:?} is of the other family than the traffic it is given for \
         (IPv4 traffic leaves with an IPv4 address, IPv6 traffic with an IPv6 one)"
    )]
    EgressIpWrongFamily { ip: IpAddr, policy: String },

    #[error("more than {max} policies on this node: policy ids must fit the 16-bit packet mark")]
    TooManyPolicies { max: u32 },

    #[error(
        "more than {max} egress addresses or interfaces on this node: the mark's egress bits \
         (--mark-egress) hold no more; entries of {policy:?} are programmed to drop"
    )]
    TooManyEgresses { max: u32, policy: String },

    #[error("the plan in {path} has no section for node {node:?}")]
    NodeNotInPlan { path: PathBuf, node: String },

    #[error("reading the plan {path}")]
    Plan {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("loading the eBPF object")]
    Load(#[source] aya::EbpfError),

    #[error("eBPF program {name}: {action}")]
    Program {
        name: &'static str,
        action: String,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error("eBPF map {name}: {action}")]
    Map {
        name: &'static str,
        action: String,
        #[source]
        source: aya::maps::MapError,
    },

    #[error("pinning {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },

    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

/// The shim's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Whether an error chain bottoms out in EPERM/EACCES from the kernel.
pub fn is_permission_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
        {
            return true;
        }
        cur = e.source();
    }
    false
}
