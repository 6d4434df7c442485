//! What keeps a realtime VM's vCPUs in the guest: the exits KVM can leave to the guest
//! (`KVM_CAP_X86_DISABLE_EXITS`: HLT, PAUSE, MWAIT, C-states), halt polling
//! (`KVM_CAP_HALT_POLL`), and the CPUID a real-time guest relies on (TSC-deadline timer,
//! invariant TSC).
//!
//! What to ask for is an [`ExitPolicy`]; what the host offers is a [`HostOffer`]; [`decide`]
//! (pure, tested without KVM) turns the two into what is enabled, an error for a required
//! setting the host refuses, and a warning for an optional one.

use std::fmt;
use std::io;
use std::str::FromStr;

use kvm_bindings::{
    kvm_enable_cap, KVM_CAP_HALT_POLL, KVM_CAP_X86_DISABLE_EXITS, KVM_X86_DISABLE_EXITS_CSTATE,
    KVM_X86_DISABLE_EXITS_HLT, KVM_X86_DISABLE_EXITS_MWAIT, KVM_X86_DISABLE_EXITS_PAUSE,
};
use kvm_ioctls::{Kvm, VmFd};

/// Where the kvm module says whether it refuses HLT, MWAIT and C-state passthrough while SMT is
/// on (an AMD return-stack erratum; Linux 6.4 and later, and stable kernels).
const MITIGATE_SMT_RSB: &str = "/sys/module/kvm/parameters/mitigate_smt_rsb";

/// Whether this architecture's KVM can leave exits to the guest at all. Arm's cannot: it has no
/// `KVM_CAP_X86_DISABLE_EXITS` (nor another exit-disabling capability), and traps WFI and WFE
/// as it sets them itself.
const ARCH_HAS_EXIT_CONTROL: bool = cfg!(target_arch = "x86_64");

/// The exits KVM can leave to the guest, in the order tandem names them.
const EXITS: [(u32, &str); 4] = [
    (KVM_X86_DISABLE_EXITS_HLT, "hlt"),
    (KVM_X86_DISABLE_EXITS_PAUSE, "pause"),
    (KVM_X86_DISABLE_EXITS_MWAIT, "mwait"),
    (KVM_X86_DISABLE_EXITS_CSTATE, "cstate"),
];

/// A set of exits that KVM can leave to the guest, as KVM's mask. Parses from `none` or a
/// comma-separated list of `hlt`, `pause`, `mwait`, `cstate`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitSet(u32);

impl ExitSet {
    /// No exit left to the guest.
    pub const NONE: ExitSet = ExitSet(0);
    /// HLT and PAUSE.
    pub const HLT_PAUSE: ExitSet = ExitSet(KVM_X86_DISABLE_EXITS_HLT | KVM_X86_DISABLE_EXITS_PAUSE);
    /// Every exit KVM can leave to the guest: what a realtime VM takes by default where the
    /// host offers it.
    pub const ALL: ExitSet = ExitSet(
        KVM_X86_DISABLE_EXITS_HLT
            | KVM_X86_DISABLE_EXITS_PAUSE
            | KVM_X86_DISABLE_EXITS_MWAIT
            | KVM_X86_DISABLE_EXITS_CSTATE,
    );

    /// KVM's mask.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether HLT exits are in the set.
    pub fn has_hlt(self) -> bool {
        self.0 & KVM_X86_DISABLE_EXITS_HLT != 0
    }

    fn and(self, other: ExitSet) -> ExitSet {
        ExitSet(self.0 & other.0)
    }

    fn or(self, other: ExitSet) -> ExitSet {
        ExitSet(self.0 | other.0)
    }

    fn minus(self, other: ExitSet) -> ExitSet {
        ExitSet(self.0 & !other.0)
    }
}

impl fmt::Display for ExitSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("none");
        }
        let names: Vec<&str> = EXITS
            .iter()
            .filter(|(bit, _)| self.0 & bit != 0)
            .map(|(_, name)| *name)
            .collect();
        f.write_str(&names.join(","))
    }
}

impl FromStr for ExitSet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "none" {
            return Ok(ExitSet::NONE);
        }
        let mut set = 0;
        for word in s.split(',') {
            match EXITS.iter().find(|(_, name)| *name == word) {
                Some((bit, _)) => set |= bit,
                None => {
                    return Err(format!(
                    "unknown exit '{word}': expected none or a list of hlt, pause, mwait, cstate"
                ))
                }
            }
        }
        Ok(ExitSet(set))
    }
}

/// What a VM asks of KVM to stay in the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitPolicy {
    /// Exits left to the guest; a host that refuses one is an error.
    pub disable_exits: ExitSet,
    /// Exits left to the guest where the host offers it; a refusal is a warning.
    pub disable_exits_optional: ExitSet,
    /// The VM's halt-polling limit in nanoseconds (`None`: the kvm module's default).
    pub halt_poll_ns: Option<u32>,
}

impl ExitPolicy {
    /// A realtime VM's default: every exit the host offers stays in the guest, with a warning
    /// for each it keeps (a default never stops a VM from starting; a list the user gives does),
    /// and halt polling as the host has it.
    pub const REALTIME: ExitPolicy = ExitPolicy {
        disable_exits: ExitSet::NONE,
        disable_exits_optional: ExitSet::ALL,
        halt_poll_ns: None,
    };

    /// The policy from what the user gave: a realtime VM on CPUs of its own starts from
    /// [`ExitPolicy::REALTIME`], any other from nothing; given lists replace the defaults.
    pub fn choose(
        dedicated: bool,
        disable_exits: Option<ExitSet>,
        disable_exits_optional: Option<ExitSet>,
        halt_poll_ns: Option<u32>,
    ) -> ExitPolicy {
        let base = if dedicated {
            ExitPolicy::REALTIME
        } else {
            ExitPolicy::default()
        };
        ExitPolicy {
            disable_exits: disable_exits.unwrap_or(base.disable_exits),
            disable_exits_optional: disable_exits_optional.unwrap_or(base.disable_exits_optional),
            halt_poll_ns,
        }
    }

    /// Whether any exit would be left to the guest.
    pub fn disables_any(&self) -> bool {
        !self
            .disable_exits
            .or(self.disable_exits_optional)
            .is_empty()
    }

    /// Checks the policy against the VM's placement: a vCPU that stays in the guest when idle
    /// never gives its host CPU back, so it must be a realtime vCPU pinned to a CPU of its own.
    pub fn check(&self, realtime: bool, pinned: bool) -> Result<(), RealtimeError> {
        if self.disables_any() && !(realtime && pinned) {
            return Err(RealtimeError::NeedsDedicatedCpus(
                self.disable_exits.or(self.disable_exits_optional),
            ));
        }
        Ok(())
    }
}

/// What this host's KVM offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostOffer {
    /// The exits KVM may leave to the guest (`None`: no `KVM_CAP_X86_DISABLE_EXITS`).
    pub disable_exits: Option<ExitSet>,
    /// Whether the VM's halt polling can be set (`KVM_CAP_HALT_POLL`).
    pub halt_poll: bool,
    /// Whether the kvm module's `mitigate_smt_rsb` is on.
    pub mitigate_smt_rsb: bool,
}

impl HostOffer {
    /// Asks KVM and the kvm module.
    pub fn probe(kvm: &Kvm) -> HostOffer {
        let mask = kvm.check_extension_raw(KVM_CAP_X86_DISABLE_EXITS.into());
        HostOffer {
            disable_exits: (mask > 0).then_some(ExitSet(mask as u32)),
            halt_poll: kvm.check_extension_raw(KVM_CAP_HALT_POLL.into()) > 0,
            mitigate_smt_rsb: std::fs::read_to_string(MITIGATE_SMT_RSB)
                .is_ok_and(|v| v.trim() == "Y" || v.trim() == "1"),
        }
    }
}

/// What [`decide`] settled on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// The exits to leave to the guest.
    pub disable: ExitSet,
    /// The halt-polling limit to set.
    pub halt_poll_ns: Option<u32>,
    /// Optional settings the host refused, one sentence each.
    pub warnings: Vec<String>,
}

impl Decision {
    /// One line for the log and `tandem ps`: what is in force.
    pub fn describe(&self) -> String {
        let poll = match self.halt_poll_ns {
            Some(ns) => format!("{ns} ns"),
            None => "host default".into(),
        };
        format!(
            "exits left to the guest: {}; halt polling: {poll}",
            self.disable
        )
    }
}

/// A realtime setting the host refuses, or that KVM failed to apply.
#[derive(Debug, thiserror::Error)]
pub enum RealtimeError {
    /// Required exits the host will not leave to the guest.
    #[error("--disable-exits {exits}: this host's KVM will not leave {exits} to the guest: {why}")]
    ExitsRefused {
        /// The refused exits.
        exits: ExitSet,
        /// Why, with what to do.
        why: String,
    },
    /// Exits left to the guest of a vCPU without a CPU of its own.
    #[error("--disable-exits {0}: needs --realtime and --pin-cpus (a vCPU that stays in the guest when idle keeps its host CPU, so it needs one of its own)")]
    NeedsDedicatedCpus(ExitSet),
    /// No per-VM halt-polling control.
    #[error("--halt-poll-ns: this host's KVM cannot set a VM's halt polling (KVM_CAP_HALT_POLL needs Linux 5.14 or later)")]
    HaltPoll,
    /// `KVM_ENABLE_CAP` failed.
    #[error("{cap}: KVM refused it: {source}")]
    Enable {
        /// The capability.
        cap: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// Why the host refuses `exits`.
fn refusal(exits: ExitSet, offer: &HostOffer) -> String {
    const SMT_RSB_BOUND: ExitSet = ExitSet(
        KVM_X86_DISABLE_EXITS_HLT | KVM_X86_DISABLE_EXITS_MWAIT | KVM_X86_DISABLE_EXITS_CSTATE,
    );
    if offer.disable_exits.is_none() {
        if !ARCH_HAS_EXIT_CONTROL {
            return "Arm has no exit-disabling capability (KVM traps WFI and WFE as it sets them)"
                .into();
        }
        return "it has no KVM_CAP_X86_DISABLE_EXITS (Linux 4.17 or later)".into();
    }
    if offer.mitigate_smt_rsb && !exits.and(SMT_RSB_BOUND).is_empty() {
        return format!(
            "the kvm module's mitigate_smt_rsb is on ({MITIGATE_SMT_RSB}), which keeps HLT, MWAIT \
             and C-state exits while SMT is on: turn SMT off, or load kvm with \
             mitigate_smt_rsb=0 on a CPU without that erratum"
        );
    }
    if exits.bits() & KVM_X86_DISABLE_EXITS_MWAIT != 0 {
        return "the host CPU cannot let a guest run MWAIT (no MONITOR/MWAIT, an erratum, or no \
                always-running APIC timer)"
            .into();
    }
    "the kvm module does not offer it".into()
}

/// Settles what to enable: every required exit the host offers (else an error), the optional
/// ones it offers (else a warning), and halt polling.
pub fn decide(policy: &ExitPolicy, offer: &HostOffer) -> Result<Decision, RealtimeError> {
    let offered = offer.disable_exits.unwrap_or(ExitSet::NONE);
    let refused = policy.disable_exits.minus(offered);
    if !refused.is_empty() {
        return Err(RealtimeError::ExitsRefused {
            exits: refused,
            why: refusal(refused, offer),
        });
    }
    let mut warnings = Vec::new();
    let optional = policy.disable_exits_optional.minus(policy.disable_exits);
    let refused = optional.minus(offered);
    // Where no kernel could offer them, the optional ones are no news worth a warning.
    if !refused.is_empty() && (ARCH_HAS_EXIT_CONTROL || offer.disable_exits.is_some()) {
        warnings.push(format!("{refused} exits stay: {}", refusal(refused, offer)));
    }
    if policy.halt_poll_ns.is_some() && !offer.halt_poll {
        return Err(RealtimeError::HaltPoll);
    }
    Ok(Decision {
        disable: policy.disable_exits.or(optional.and(offered)),
        halt_poll_ns: policy.halt_poll_ns,
        warnings,
    })
}

/// Applies `decision` to a VM that has no vCPU yet (KVM refuses exit changes after the first).
pub fn apply(vm: &VmFd, decision: &Decision) -> Result<(), RealtimeError> {
    if !decision.disable.is_empty() {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_X86_DISABLE_EXITS,
            ..Default::default()
        };
        cap.args[0] = decision.disable.bits().into();
        vm.enable_cap(&cap).map_err(|e| RealtimeError::Enable {
            cap: "KVM_CAP_X86_DISABLE_EXITS",
            source: io::Error::from_raw_os_error(e.errno()),
        })?;
    }
    if let Some(ns) = decision.halt_poll_ns {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_HALT_POLL,
            ..Default::default()
        };
        cap.args[0] = ns.into();
        vm.enable_cap(&cap).map_err(|e| RealtimeError::Enable {
            cap: "KVM_CAP_HALT_POLL",
            source: io::Error::from_raw_os_error(e.errno()),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> ExitSet {
        s.parse().unwrap()
    }

    fn offer(exits: &str) -> HostOffer {
        HostOffer {
            disable_exits: Some(set(exits)),
            halt_poll: true,
            mitigate_smt_rsb: false,
        }
    }

    #[test]
    fn exit_sets_parse_and_print_in_one_order() {
        assert_eq!(set("cstate,hlt").to_string(), "hlt,cstate");
        assert_eq!(set("none"), ExitSet::NONE);
        assert_eq!(ExitSet::NONE.to_string(), "none");
        assert_eq!(set("hlt,pause"), ExitSet::HLT_PAUSE);
        assert_eq!(set("hlt,pause,mwait,cstate").bits(), 0xf);
        let e = "hlt,nmi".parse::<ExitSet>().unwrap_err();
        assert!(e.contains("unknown exit 'nmi'"), "{e}");
        assert!("".parse::<ExitSet>().is_err());
    }

    #[test]
    fn the_realtime_default_takes_what_is_offered_and_warns_for_the_rest() {
        let d = decide(&ExitPolicy::REALTIME, &offer("hlt,pause,cstate")).unwrap();
        assert_eq!(d.disable.to_string(), "hlt,pause,cstate");
        assert_eq!(d.warnings.len(), 1);
        assert!(
            d.warnings[0].starts_with("mwait exits stay: the host CPU cannot"),
            "{:?}",
            d.warnings
        );
        assert_eq!(
            d.describe(),
            "exits left to the guest: hlt,pause,cstate; halt polling: host default"
        );
        let all = decide(&ExitPolicy::REALTIME, &offer("hlt,pause,mwait,cstate")).unwrap();
        assert_eq!(all.disable.bits(), 0xf);
        assert!(all.warnings.is_empty());
    }

    #[test]
    fn a_required_exit_the_host_refuses_is_an_error_that_says_why() {
        let smt = HostOffer {
            mitigate_smt_rsb: true,
            ..offer("pause")
        };
        let hlt_pause = ExitPolicy {
            disable_exits: ExitSet::HLT_PAUSE,
            ..ExitPolicy::default()
        };
        let e = decide(&hlt_pause, &smt).unwrap_err().to_string();
        assert!(
            e.starts_with("--disable-exits hlt: this host's KVM will not leave hlt"),
            "{e}"
        );
        assert!(e.contains("mitigate_smt_rsb"), "{e}");
        let none = HostOffer::default();
        let e = decide(&hlt_pause, &none).unwrap_err().to_string();
        let why = if ARCH_HAS_EXIT_CONTROL {
            "no KVM_CAP_X86_DISABLE_EXITS"
        } else {
            "Arm has no exit-disabling capability"
        };
        assert!(e.contains("hlt,pause") && e.contains(why), "{e}");
        // The realtime default only warns, even where nothing is offered; where nothing ever
        // is (Arm), it says nothing.
        let d = decide(&ExitPolicy::REALTIME, &none).unwrap();
        assert_eq!(d.disable, ExitSet::NONE);
        if ARCH_HAS_EXIT_CONTROL {
            assert_eq!(d.warnings.len(), 1);
            assert!(
                d.warnings[0].starts_with("hlt,pause,mwait,cstate exits stay: "),
                "{:?}",
                d.warnings
            );
        } else {
            assert!(d.warnings.is_empty(), "{:?}", d.warnings);
        }
        // Asking for nothing needs nothing.
        assert_eq!(
            decide(&ExitPolicy::default(), &none).unwrap(),
            Decision::default()
        );
    }

    #[test]
    fn exits_stay_in_the_guest_only_on_dedicated_cpus() {
        let p = ExitPolicy::REALTIME;
        assert!(p.check(true, true).is_ok());
        for (rt, pin) in [(true, false), (false, true), (false, false)] {
            let e = p.check(rt, pin).unwrap_err().to_string();
            assert!(
                e.starts_with(
                    "--disable-exits hlt,pause,mwait,cstate: needs --realtime and --pin-cpus"
                ),
                "{e}"
            );
        }
        assert!(ExitPolicy::default().check(false, false).is_ok());
    }

    #[test]
    fn defaults_apply_to_dedicated_realtime_vcpus_and_given_lists_replace_them() {
        assert_eq!(
            ExitPolicy::choose(true, None, None, None),
            ExitPolicy::REALTIME
        );
        assert_eq!(
            ExitPolicy::choose(false, None, None, None),
            ExitPolicy::default()
        );
        let p = ExitPolicy::choose(true, Some(ExitSet::NONE), None, Some(0));
        assert_eq!(p.disable_exits, ExitSet::NONE);
        assert_eq!(p.disable_exits_optional, ExitSet::ALL);
        assert_eq!(p.halt_poll_ns, Some(0));
        let p = ExitPolicy::choose(false, Some(set("pause")), None, None);
        assert!(
            p.check(false, false).is_err(),
            "given lists are checked, not dropped"
        );
    }

    #[test]
    fn halt_polling_needs_the_capability() {
        let p = ExitPolicy {
            halt_poll_ns: Some(0),
            ..ExitPolicy::default()
        };
        assert_eq!(decide(&p, &offer("pause")).unwrap().halt_poll_ns, Some(0));
        let no = HostOffer {
            halt_poll: false,
            ..offer("pause")
        };
        assert!(matches!(decide(&p, &no), Err(RealtimeError::HaltPoll)));
    }

    #[test]
    fn required_wins_over_optional() {
        let p = ExitPolicy {
            disable_exits: set("hlt"),
            disable_exits_optional: set("hlt,mwait"),
            halt_poll_ns: None,
        };
        let d = decide(&p, &offer("hlt,pause")).unwrap();
        assert_eq!(d.disable, set("hlt"));
        assert_eq!(
            d.warnings.len(),
            1,
            "only mwait is warned about: {:?}",
            d.warnings
        );
        assert!(d.warnings[0].starts_with("mwait exits stay"));
    }
}
