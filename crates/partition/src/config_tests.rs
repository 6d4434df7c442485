use super::*;

fn host() -> Host {
    Host {
        cpus: (0..4).collect(),
        memory: 8 << 30,
    }
}

fn check(text: &str) -> Result<Config, ConfigError> {
    let c = Config::parse(Path::new("p.toml"), text.to_string())?;
    c.validate(&host())?;
    Ok(c)
}

fn err(text: &str) -> String {
    check(text).unwrap_err().to_string()
}

const TWO: &str = r#"
[[vm]]
name = "control"
role = "realtime"
kernel = "/k-rt"
memory = "256M"
cpus = [1]
restart = "on-failure"
lock_memory = true

[[vm]]
name = "ui"
kernel = "/k"
initrd = "/i"
memory = 512
cpus = [0, 2]
disks = ["path=/d.img"]
net = "user"
forwards = ["tcp:2222:22"]
restart = "always"

[[channel]]
name = "ctl"
size = "1M"
members = ["control", "ui"]
"#;

#[test]
fn a_two_partition_config_parses_and_validates() {
    let c = check(TWO).unwrap();
    assert_eq!(c.vms.len(), 2);
    let control = &c.vms[0];
    assert_eq!(control.role, Role::Realtime);
    assert_eq!(control.restart, Restart::OnFailure);
    assert!(control.lock_memory);
    assert_eq!(control.memory.get_ref().0, 256 << 20);
    let ui = &c.vms[1];
    assert_eq!(ui.role, Role::General);
    assert_eq!(ui.memory.get_ref().0, 512 << 20, "a bare number is MiB");
    assert_eq!(ui.cpus.get_ref(), &vec![0, 2]);
    assert_eq!(ui.restart, Restart::Always);
    assert_eq!(c.channels[0].size.get_ref().0, 1 << 20);
    assert_eq!(c.line(ui.name.span()), 12);
}

#[test]
fn unknown_keys_and_bad_values_name_their_line() {
    assert_eq!(
        err("[[vm]]\nname = \"a\"\nkernel = \"/k\"\nmemory = \"1G\"\ncpus = [0]\ncolour = \"red\"\n"),
        "p.toml:6: unknown field `colour`, expected one of `name`, `role`, `kernel`, `initrd`, `cmdline`, `memory`, `cpus`, `disks`, `net`, `forwards`, `restart`, `lock_memory`, `hugepages`, `jail`, `uid`, `gid`, `seccomp`, `disable_exits`, `disable_exits_optional`, `halt_poll_ns`"
    );
    let e = err(
        "[[vm]]\nname = \"a\"\nkernel = \"/k\"\nmemory = \"1G\"\ncpus = [0]\nrole = \"fast\"\n",
    );
    assert!(e.starts_with("p.toml:6: unknown variant `fast`"), "{e}");
    let e = err("[[vm]]\nname = \"a\"\nkernel = \"/k\"\nmemory = \"lots\"\ncpus = [0]\n");
    assert!(e.starts_with("p.toml:4: 'lots' is not a size"), "{e}");
    let e = err("[[vm]]\nname = \"a\"\nkernel = \"/k\"\ncpus = [0]\n");
    assert!(e.contains("missing field `memory`"), "{e}");
    let e = err("[[vmm]]\n");
    assert!(e.starts_with("p.toml:1: unknown field `vmm`"), "{e}");
    let e = err("[[vm]\n");
    assert!(e.starts_with("p.toml:1: "), "{e}");
}

fn vm(name: &str, role: &str, cpus: &str, memory: &str) -> String {
    format!("[[vm]]\nname = \"{name}\"\nrole = \"{role}\"\nkernel = \"/k\"\nmemory = \"{memory}\"\ncpus = {cpus}\n")
}

#[test]
fn cpu_placement_rules() {
    let e = err(&(vm("a", "realtime", "[1]", "64M") + &vm("b", "realtime", "[1]", "64M")));
    assert_eq!(
        e,
        "p.toml:12: realtime VMs 'a' (line 6) and 'b' both claim CPU 1"
    );
    let e = err(&(vm("a", "realtime", "[1]", "64M") + &vm("b", "general", "[0, 1]", "64M")));
    assert_eq!(
        e,
        "p.toml:12: CPU 1 belongs to realtime VM 'a' (line 6); 'b' cannot share it"
    );
    let e = err(&(vm("a", "general", "[2]", "64M") + &vm("b", "realtime", "[2]", "64M")));
    assert_eq!(
        e,
        "p.toml:12: realtime VM 'b' needs CPU 2 to itself, but 'a' (line 6) uses it"
    );
    // General VMs may share.
    check(&(vm("a", "general", "[0]", "64M") + &vm("b", "general", "[0]", "64M"))).unwrap();
    let e = err(&vm("a", "general", "[7]", "64M"));
    assert_eq!(
        e,
        "p.toml:6: CPU 7 does not exist on this host (online: 0-3)"
    );
    let e = err(&vm("a", "general", "[]", "64M"));
    assert_eq!(e, "p.toml:6: VM 'a' has no CPUs");
    let e = err(&vm("a", "general", "[1, 1]", "64M"));
    assert_eq!(e, "p.toml:6: VM 'a' lists CPU 1 twice");
}

#[test]
fn names_memory_and_channels() {
    let e = err(&(vm("a", "general", "[0]", "64M") + &vm("a", "general", "[1]", "64M")));
    assert_eq!(e, "p.toml:8: a VM named 'a' is already declared on line 2");
    let e = err(&vm("a b", "general", "[0]", "64M"));
    assert!(e.starts_with("p.toml:2: 'a b' is not a VM name"), "{e}");
    let e = err(&vm("a", "general", "[0]", "16M"));
    assert_eq!(
        e,
        "p.toml:5: VM 'a': 16 MiB of memory is less than the 32 MiB minimum"
    );
    let e = err(&(vm("a", "general", "[0]", "6G") + &vm("b", "general", "[1]", "4G")));
    assert_eq!(
        e,
        "p.toml:11: the VMs up to 'b' need 10240 MiB of memory; this host has 8192 MiB"
    );
    let two = vm("a", "general", "[0]", "64M") + &vm("b", "general", "[1]", "64M");
    let e = err(
        &(two.clone() + "[[channel]]\nname = \"c\"\nsize = \"1M\"\nmembers = [\"a\", \"z\"]\n")
    );
    assert_eq!(e, "p.toml:16: channel 'c': no VM named 'z'");
    let e = err(
        &(two.clone() + "[[channel]]\nname = \"c\"\nsize = \"3K\"\nmembers = [\"a\", \"b\"]\n")
    );
    assert_eq!(
        e,
        "p.toml:15: channel 'c': size 3072 is not a power of two of at least 4 KiB"
    );
    let e = err(&(two.clone() + "[[channel]]\nname = \"c\"\nsize = \"4K\"\nmembers = [\"a\"]\n"));
    assert_eq!(e, "p.toml:16: channel 'c' needs at least two members");
    let e = err(&(two + "[[channel]]\nname = \"c\"\nsize = \"4K\"\nmembers = [\"a\", \"a\"]\n"));
    assert_eq!(e, "p.toml:16: channel 'c' lists 'a' twice");
    assert_eq!(err(""), "p.toml: no [[vm]] declared");
}

#[test]
fn cpu_lists_are_compact() {
    assert_eq!(
        cpu_list(&[0, 1, 2, 5, 7, 8].into_iter().collect()),
        "0-2,5,7-8"
    );
}

#[test]
fn sandbox_keys_are_checked_with_their_line() {
    let vm = "[[vm]]\nname = \"a\"\nkernel = \"/k\"\nmemory = \"256M\"\ncpus = [0]\n";
    let e = err(&format!("{vm}seccomp = \"strict\"\n"));
    assert!(
        e.contains("p.toml:6") && e.contains("seccomp 'strict' is not enforce, log or off"),
        "{e}"
    );
    let e = err(&format!("{vm}jail = false\nuid = 1000\n"));
    assert!(
        e.contains("p.toml:7") && e.contains("uid and gid apply to a jailed VM"),
        "{e}"
    );
    let c = check(&format!("{vm}uid = 1000\ngid = 100\nseccomp = \"log\"\n")).unwrap();
    assert!(c.vms[0].jailed());
}

#[test]
fn only_a_realtime_vm_leaves_exits_to_the_guest() {
    let general = TWO.replace(
        "restart = \"always\"",
        "restart = \"always\"\ndisable_exits = \"hlt\"",
    );
    assert_eq!(
        err(&general),
        "p.toml:21: VM 'ui': only a realtime VM can leave exits to the guest (its vCPUs need CPUs of their own)"
    );
    // Saying none is always allowed, and a realtime VM may choose its own.
    let none = TWO.replace(
        "restart = \"always\"",
        "restart = \"always\"\ndisable_exits_optional = \"none\"",
    );
    assert!(check(&none).is_ok());
    let rt = TWO.replace(
        "lock_memory = true",
        "lock_memory = true\ndisable_exits = \"pause\"\nhalt_poll_ns = 0",
    );
    let c = check(&rt).unwrap();
    assert_eq!(c.vms[0].disable_exits.as_ref().unwrap().get_ref(), "pause");
    assert_eq!(*c.vms[0].halt_poll_ns.as_ref().unwrap().get_ref(), 0);
}
