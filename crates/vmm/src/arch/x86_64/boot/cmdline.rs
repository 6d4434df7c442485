//! What tandem adds to the guest's command line.

use std::borrow::Cow;

use crate::layout::CMDLINE_MAX;

/// The command line the guest gets for the user's `cmdline`: with `pci=off` added when the VM
/// has no PCI bus (`pci` false) and the user did not set `pci=` themselves, as Firecracker adds
/// it: without it, Linux probes for configuration mechanisms (ports 0xcf8-0xcff, each access an
/// exit) and scans a bus that is not there. It goes before an unquoted `--` (what follows that
/// is init's), and is left out where it would not fit.
pub fn guest_cmdline(cmdline: &str, pci: bool) -> Cow<'_, str> {
    const PCI_OFF: &str = "pci=off";
    let args = args(cmdline);
    if pci || args.iter().any(|&(_, a)| a.starts_with("pci=")) {
        return Cow::Borrowed(cmdline);
    }
    if cmdline.len() + 1 + PCI_OFF.len() + 1 > CMDLINE_MAX {
        return Cow::Borrowed(cmdline);
    }
    let out = match args.iter().find(|&&(_, a)| a == "--") {
        Some(&(at, _)) => format!("{}{PCI_OFF} {}", &cmdline[..at], &cmdline[at..]),
        None if cmdline.trim().is_empty() => PCI_OFF.to_owned(),
        None => format!("{} {PCI_OFF}", cmdline.trim_end()),
    };
    Cow::Owned(out)
}

/// The kernel's arguments with their byte offsets, split on whitespace outside double quotes
/// as the kernel's `next_arg` splits them; arguments after `--` are not scanned.
fn args(cmdline: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = None;
    let mut quoted = false;
    for (i, c) in cmdline.char_indices() {
        if c == '"' {
            quoted = !quoted;
        }
        match (c.is_whitespace() && !quoted, start) {
            (true, Some(s)) => {
                out.push((s, &cmdline[s..i]));
                start = None;
                if &cmdline[s..i] == "--" {
                    return out;
                }
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, &cmdline[s..]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_without_pci_gets_pci_off_at_the_end() {
        assert_eq!(
            guest_cmdline("console=ttyS0 reboot=k panic=-1", false),
            "console=ttyS0 reboot=k panic=-1 pci=off"
        );
        assert_eq!(guest_cmdline("", false), "pci=off");
    }

    #[test]
    fn a_vm_with_pci_or_a_users_pci_setting_is_left_alone() {
        assert_eq!(guest_cmdline("console=ttyS0", true), "console=ttyS0");
        assert_eq!(
            guest_cmdline("console=ttyS0 pci=noacpi", false),
            "console=ttyS0 pci=noacpi"
        );
    }

    #[test]
    fn init_arguments_after_a_double_dash_stay_inits() {
        assert_eq!(
            guest_cmdline("quiet -- single pci=x", false),
            "quiet pci=off -- single pci=x"
        );
    }

    #[test]
    fn quoted_values_are_one_argument() {
        let c = r#"quiet tandem.exec="echo -- pci=on""#;
        assert_eq!(guest_cmdline(c, false), format!("{c} pci=off"));
    }

    #[test]
    fn a_command_line_at_the_limit_is_not_lengthened() {
        let c = "a".repeat(CMDLINE_MAX - 1);
        assert_eq!(guest_cmdline(&c, false), c);
    }
}
