//! CNI stand-ins: configurations of the nodes that reproduce what a CNI does to a packet on the
//! node, so that Sluice's tests can run beside each (docs/architecture.md, "Beside other CNIs:
//! what was tested how"). No real CNI runs here; each stand-in copies the one habit of a CNI that
//! can get in Sluice's way.

use std::{fs, path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::{NODES, Testbed, in_netns};

/// The pods [`CniStandIn::BridgedPods`] adds, (pod, node, IP): behind a bridge `cni0` on n3, in
/// n3's pod subnet 10.244.3.0/24 (the other nodes already route it to n3).
pub const BRIDGED_PODS: [(&str, &str, &str); 2] = [("p4", "n3", "10.244.3.10"), ("p5", "n3", "10.244.3.11")];

/// The underlay's MTU, which [`CniStandIn::PodMtuOfUnderlay`] gives the pods.
pub const UNDERLAY_MTU: u32 = 1500;

/// What a CNI's program ahead of Sluice's on a pod interface returns for every packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcxVerdict {
    /// `TC_ACT_UNSPEC` (= `TCX_NEXT`): the programs after it, Sluice's among them, run too.
    Next,
    /// `TC_ACT_OK` (= `TCX_PASS`): processing ends there, Sluice's program never sees the packet
    /// (an eBPF CNI with a datapath of its own that hands every packet on itself).
    Pass,
}

/// A CNI's habit on the node, reproduced ([`Testbed::apply_stand_in`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CniStandIn {
    /// The testbed as built: a /32 route per pod to its veth with proxy ARP (Calico, Cilium with
    /// endpoint routes, AWS VPC CNI), pod MTU 1450, masquerade of pod traffic leaving the node.
    RoutedPods,
    /// Pods with the underlay's MTU ([`UNDERLAY_MTU`]), as native-routing CNIs set it (AWS VPC
    /// CNI, GKE VPC-native, Calico without encapsulation): full-size packets do not fit Sluice's
    /// tunnel.
    PodMtuOfUnderlay,
    /// Calico's iptables chains' use of the mark: bits of its mask (`0xffff0000`) set on every
    /// packet as it arrives (`raw` prerouting), expected intact when it leaves (counted by
    /// [`Testbed::calico_like_marks_kept`]).
    CalicoLikeMarks,
    /// Flannel's VXLAN backend: an overlay of its own (`flannel.1`, UDP 8472) between the nodes'
    /// pod subnets, and Flannel's masquerade rules in place of the testbed's.
    FlannelLikeOverlay,
    /// Pods behind a bridge (Flannel, kubenet, the bridge plugin): [`BRIDGED_PODS`], the subnet
    /// routed to the bridge rather than to each pod's veth.
    BridgedPods,
    /// A TCX program of the CNI's (as Cilium attaches its own) first on every pod interface,
    /// ahead of Sluice's, counting what it sees ([`Testbed::cilium_like_program_runs`]).
    CiliumLikeProgram(TcxVerdict),
}

/// What Calico's chains do with the mark (iptables and ip6tables alike), in nftables: set early,
/// checked late (a counter per family of the packets to the external network whose bits are
/// still there).
const CALICO_LIKE_MARKS: &str = "table inet calico {\n chain raw {\n  \
     type filter hook prerouting priority -300; policy accept;\n  \
     meta mark set meta mark | 0xabcd0000\n }\n chain kept {\n  \
     type filter hook postrouting priority 300; policy accept;\n  \
     ip daddr 203.0.113.0/24 meta mark & 0xffff0000 == 0xabcd0000 counter\n  \
     ip6 daddr fd00:203:0:113::/64 meta mark & 0xffff0000 == 0xabcd0000 counter\n }\n}\n";

/// The CNI's program: counts every packet in a map (pinned, shared by every node), then returns
/// the verdict of the function attached.
const CILIUM_LIKE_PROGRAM: &str = r#"#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} cni_seen SEC(".maps");

static __always_inline void count(void)
{
    __u32 key = 0;
    __u64 *n = bpf_map_lookup_elem(&cni_seen, &key);
    if (n)
        __sync_fetch_and_add(n, 1);
}

SEC("classifier/next") int cni_next(struct __sk_buff *skb) { count(); return TC_ACT_UNSPEC; }
SEC("classifier/pass") int cni_pass(struct __sk_buff *skb) { count(); return TC_ACT_OK; }

char _license[] SEC("license") = "GPL";
"#;

impl Testbed {
    /// Reconfigures the nodes as `stand_in` says. Apply it right after building the testbed (its
    /// pods and, for [`CniStandIn::CiliumLikeProgram`], their interfaces are those present then).
    pub fn apply_stand_in(&mut self, stand_in: CniStandIn) -> Result<()> {
        match stand_in {
            CniStandIn::RoutedPods => Ok(()),
            CniStandIn::PodMtuOfUnderlay => self
                .pods()
                .iter()
                .try_for_each(|(p, _, _)| self.set_pod_mtu(p, UNDERLAY_MTU)),
            CniStandIn::CalicoLikeMarks => NODES
                .iter()
                .try_for_each(|(node, _)| self.nft(node, CALICO_LIKE_MARKS)),
            CniStandIn::FlannelLikeOverlay => {
                self.use_flannel_like_overlay()?;
                self.use_flannel_like_masquerade()
            }
            CniStandIn::BridgedPods => {
                let pods: Vec<_> = BRIDGED_PODS.iter().map(|(p, _, ip)| (*p, *ip)).collect();
                self.try_add_bridged_pods("n3", "10.244.3", &pods)
            }
            CniStandIn::CiliumLikeProgram(verdict) => self.pods().iter().try_for_each(|(p, node, _)| {
                self.attach_ahead_of_sluice(node, &format!("veth-{p}"), verdict)
            }),
        }
    }

    /// Packets the stand-in demonstrably acted on so far, for those that act on packets (marks
    /// kept, packets over the overlay, runs of the program): a test beside it shows with this that
    /// the stand-in was in the packets' way. `None` for the others (their effect is the setup).
    pub fn stand_in_packets(&self, stand_in: CniStandIn) -> Result<Option<u64>> {
        let per_node = |f: &dyn Fn(&str) -> Result<u64>| -> Result<u64> {
            NODES.iter().map(|(node, _)| f(node)).sum::<Result<u64>>()
        };
        Ok(match stand_in {
            CniStandIn::CalicoLikeMarks => Some(per_node(&|node| self.calico_like_marks_kept(node))?),
            CniStandIn::FlannelLikeOverlay => Some(per_node(&|node| {
                let tx = self.run(node, "cat", &["/sys/class/net/flannel.1/statistics/tx_packets"])?;
                tx.trim().parse().context("flannel.1 tx_packets")
            })?),
            CniStandIn::CiliumLikeProgram(_) => Some(self.cilium_like_program_runs()?),
            CniStandIn::RoutedPods | CniStandIn::PodMtuOfUnderlay | CniStandIn::BridgedPods => None,
        })
    }

    /// Packets that left `node` for the external network (203.0.113.0/24) with the bits
    /// [`CniStandIn::CalicoLikeMarks`] set still on them.
    pub fn calico_like_marks_kept(&self, node: &str) -> Result<u64> {
        self.calico_like_marks_counter(node, 1)
    }

    /// [`Testbed::calico_like_marks_kept`] for IPv6 (fd00:203:0:113::/64).
    pub fn calico_like_marks_kept_v6(&self, node: &str) -> Result<u64> {
        self.calico_like_marks_counter(node, 2)
    }

    /// The `nth` counter of the stand-in's `kept` chain.
    fn calico_like_marks_counter(&self, node: &str, nth: usize) -> Result<u64> {
        let out = self.run(node, "nft", &["list", "chain", "inet", "calico", "kept"])?;
        out.split("packets ")
            .nth(nth)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no counter {nth} in {out}"))
    }

    /// Flannel's masquerade rules (its `FLANNEL-POSTRTG` chain, here in nftables) in place of the
    /// testbed's: pod-to-pod traffic is left alone, anything else from a pod is masqueraded
    /// whatever interface it leaves by, and traffic from outside the pod network to another
    /// node's pods is masqueraded too.
    fn use_flannel_like_masquerade(&self) -> Result<()> {
        for (node, _) in NODES {
            let subnet = format!("10.244.{}.0/24", &node[1..]);
            self.nft(node, "delete table ip cni\n")?;
            self.nft(
                node,
                &format!(
                    "table ip flannel {{\n chain postrtg {{\n  \
                     type nat hook postrouting priority srcnat; policy accept;\n  \
                     ip saddr {subnet} ip daddr 10.244.0.0/16 return\n  \
                     ip saddr 10.244.0.0/16 ip daddr {subnet} return\n  \
                     ip saddr != 10.244.0.0/16 ip daddr {subnet} return\n  \
                     ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random\n  \
                     ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random\n }}\n}}\n"
                ),
            )?;
        }
        Ok(())
    }

    /// Attaches a CNI's program first on `interface` of `node` (TCX ingress: the packets from the
    /// pod), ahead of Sluice's whenever that was attached, returning `verdict` for every packet.
    /// Compiled here with the clang the datapath is built with (`SLUICE_CLANG`); the link is
    /// pinned under the testbed's bpffs, so it goes with the testbed.
    pub fn attach_ahead_of_sluice(&self, node: &str, interface: &str, verdict: TcxVerdict) -> Result<()> {
        use aya::programs::{
            LinkOrder, SchedClassifier, TcAttachType,
            links::{FdLink, PinnedLink},
            tc::TcAttachOptions,
        };
        let object = self.cilium_like_object()?;
        let bytes = fs::read(&object)?;
        let name = match verdict {
            TcxVerdict::Next => "cni_next",
            TcxVerdict::Pass => "cni_pass",
        };
        let seen_pin = self.bpffs().join("cni-standin-seen");
        let link_pin = self.bpffs().join(format!("cni-standin-{node}-{interface}"));
        in_netns(&self.ns(node), || -> Result<()> {
            let mut ebpf = aya::EbpfLoader::new()
                .map_pin_path("cni_seen", seen_pin.as_path())
                .load(&bytes)
                .context("loading the stand-in's program")?;
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .context("the stand-in's program")?
                .try_into()?;
            prog.load().context("verifying the stand-in's program")?;
            let id = prog
                .attach_with_options(
                    interface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .with_context(|| format!("attaching the stand-in first on {interface} of {node}"))?;
            let link = FdLink::try_from(prog.take_link(id)?)?;
            let _: PinnedLink = link.pin(&link_pin).context("pinning the stand-in's link")?;
            Ok(())
        })
    }

    /// How many packets the programs [`Testbed::attach_ahead_of_sluice`] attached have seen, on
    /// every node together.
    pub fn cilium_like_program_runs(&self) -> Result<u64> {
        let data = aya::maps::MapData::from_pin(self.bpffs().join("cni-standin-seen"))
            .context("the stand-in's counter (no program attached yet?)")?;
        let array = aya::maps::Array::<_, u64>::try_from(aya::maps::Map::Array(data))?;
        Ok(array.get(&0, 0)?)
    }

    /// The stand-in's object file, compiled on first use into the scratch directory.
    fn cilium_like_object(&self) -> Result<std::path::PathBuf> {
        let dir = self.scratch().join("cni-standin");
        let (source, object) = (dir.join("cilium_like.bpf.c"), dir.join("cilium_like.bpf.o"));
        if object.exists() {
            return Ok(object);
        }
        fs::create_dir_all(&dir)?;
        fs::write(&source, CILIUM_LIKE_PROGRAM)?;
        let clang = std::env::var("SLUICE_CLANG").unwrap_or_else(|_| "clang".into());
        let mut cmd = Command::new(&clang);
        cmd.args(["-O2", "-g", "-target", "bpf"]);
        // The UAPI headers include <asm/types.h>, which Debian keeps under the multiarch directory.
        for multiarch in ["/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu"] {
            if Path::new(multiarch).join("asm/types.h").exists() {
                cmd.arg("-I").arg(multiarch);
                break;
            }
        }
        let out = cmd
            .arg("-c")
            .arg(&source)
            .arg("-o")
            .arg(&object)
            .output()
            .with_context(|| format!("running {clang}"))?;
        if !out.status.success() {
            let _ = fs::remove_file(&object);
            bail!(
                "compiling the stand-in's program: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(object)
    }
}
