//! Device specs given on the command line: `key=value` lists such as
//! `path=disk.img,readonly=on,cache=unsafe`.

use std::path::PathBuf;

use tandem_virtio::{BlockConfig, CacheMode};

/// Why a spec was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// An element is not `key=value`.
    #[error("'{0}' is not key=value")]
    NotKeyValue(String),
    /// A key the device does not know.
    #[error("unknown key '{key}' (known: {known})")]
    UnknownKey {
        /// The key.
        key: String,
        /// The keys that exist.
        known: String,
    },
    /// A key given twice.
    #[error("'{0}' given twice")]
    Duplicate(String),
    /// A value out of its set.
    #[error("{key}={value}: expected {expected}")]
    BadValue {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// What would be accepted.
        expected: &'static str,
    },
    /// An interface name that Linux, nft or /proc paths would not take as it is.
    #[error("tap={0:?}: not a valid interface name (1 to 15 of A-Z a-z 0-9 - _ .)")]
    InterfaceName(String),
    /// A required key is absent.
    #[error("'{0}=' is required")]
    Missing(&'static str),
}

/// Splits `a=b,c=d` into pairs, refusing duplicates and keys outside `known`.
pub fn pairs(
    spec: &str,
    known: &'static [&'static str],
) -> Result<Vec<(String, String)>, SpecError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for item in spec.split(',') {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| SpecError::NotKeyValue(item.to_string()))?;
        if !known.contains(&k) {
            return Err(SpecError::UnknownKey {
                key: k.into(),
                known: known.join(", "),
            });
        }
        if out.iter().any(|(seen, _)| seen == k) {
            return Err(SpecError::Duplicate(k.into()));
        }
        out.push((k.into(), v.into()));
    }
    Ok(out)
}

fn on_off(key: &str, v: &str) -> Result<bool, SpecError> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(SpecError::BadValue {
            key: key.into(),
            value: v.into(),
            expected: "on or off",
        }),
    }
}

/// Parses `--disk path=FILE[,readonly=on|off][,cache=writeback|unsafe][,serial=ID]`.
pub fn parse_disk(spec: &str) -> Result<BlockConfig, SpecError> {
    const KEYS: &[&str] = &["path", "readonly", "cache", "serial"];
    let mut cfg = BlockConfig {
        path: PathBuf::new(),
        readonly: false,
        cache: CacheMode::Writeback,
        serial: String::new(),
    };
    let mut path = None;
    for (k, v) in pairs(spec, KEYS)? {
        match k.as_str() {
            "path" if !v.is_empty() => path = Some(PathBuf::from(v)),
            "path" => return Err(SpecError::Missing("path")),
            "readonly" => cfg.readonly = on_off(&k, &v)?,
            "cache" => {
                cfg.cache = match v.as_str() {
                    "writeback" => CacheMode::Writeback,
                    "unsafe" => CacheMode::Unsafe,
                    _ => {
                        return Err(SpecError::BadValue {
                            key: k,
                            value: v,
                            expected: "writeback or unsafe",
                        })
                    }
                }
            }
            "serial" if v.len() <= 20 && v.bytes().all(|b| b.is_ascii_graphic()) => cfg.serial = v,
            _ => {
                return Err(SpecError::BadValue {
                    key: k,
                    value: v,
                    expected: "at most 20 printable ASCII characters",
                })
            }
        }
    }
    cfg.path = path.ok_or(SpecError::Missing("path"))?;
    Ok(cfg)
}

/// Parses `--channel path=FILE,size=SIZE[,id=N][,doorbells=FD/FD/...]`.
pub fn parse_channel(spec: &str) -> Result<tandem_vmm::ChannelConfig, SpecError> {
    const KEYS: &[&str] = &["path", "size", "id", "doorbells"];
    let (mut path, mut size, mut id) = (None, None, 0u16);
    let mut doorbells = Vec::new();
    for (k, v) in pairs(spec, KEYS)? {
        match k.as_str() {
            "path" if !v.is_empty() => path = Some(PathBuf::from(v)),
            "size" => {
                size = Some(tandem_partition::size::parse_size(&v).map_err(|_| {
                    SpecError::BadValue {
                        key: k,
                        value: v,
                        expected: "a size such as 64K, 1M or 2G",
                    }
                })?)
            }
            "id" => {
                id = v.parse().map_err(|_| SpecError::BadValue {
                    key: k,
                    value: v,
                    expected: "a peer ID from 0 to 65535",
                })?
            }
            "doorbells" => {
                let bad = SpecError::BadValue {
                    key: k.clone(),
                    value: v.clone(),
                    expected:
                        "eventfd descriptors, one per peer, each above 2 and none twice: FD/FD/...",
                };
                doorbells = v
                    .split('/')
                    .map(str::parse)
                    .collect::<Result<Vec<i32>, _>>()
                    .map_err(|_| bad.clone())?;
                // 0-2 are stdin, stdout and stderr; one descriptor has one owner.
                let mut seen = doorbells.clone();
                seen.sort_unstable();
                seen.dedup();
                if seen.len() != doorbells.len() || seen.first().is_some_and(|&fd| fd < 3) {
                    return Err(bad);
                }
            }
            _ => return Err(SpecError::Missing("path")),
        }
    }
    Ok(tandem_vmm::ChannelConfig {
        path: path.ok_or(SpecError::Missing("path"))?,
        size: size.ok_or(SpecError::Missing("size"))?,
        peer_id: id,
        doorbells,
    })
}

/// Parses `--net tap=NAME[,guest-ip=ADDR]` into the interface name and the guest's address.
pub fn parse_tap(spec: &str) -> Result<(String, Option<std::net::Ipv4Addr>), SpecError> {
    const KEYS: &[&str] = &["tap", "guest-ip"];
    let mut name = None;
    let mut guest = None;
    for (k, v) in pairs(spec, KEYS)? {
        match k.as_str() {
            "tap" if !v.is_empty() => {
                if tandem_net::tap::Tap::check_name(&v).is_err() {
                    return Err(SpecError::InterfaceName(v));
                }
                name = Some(v)
            }
            "guest-ip" => {
                guest = Some(v.parse().map_err(|_| SpecError::BadValue {
                    key: k,
                    value: v,
                    expected: "an IPv4 address",
                })?)
            }
            _ => return Err(SpecError::Missing("tap")),
        }
    }
    Ok((name.ok_or(SpecError::Missing("tap"))?, guest))
}

/// Parses `--net user[,restrict=on|off][,host-loopback=on|off|PORT/PORT...][,link-local=on|off]`.
pub fn parse_user(spec: &str) -> Result<tandem_net::user::Policy, SpecError> {
    use tandem_net::user::{HostLoopback, Policy};
    const KEYS: &[&str] = &["restrict", "host-loopback", "link-local"];
    let mut p = Policy::default();
    let rest = match spec.strip_prefix("user") {
        Some("") => return Ok(p),
        Some(r) => r.strip_prefix(',').ok_or(SpecError::Missing("user"))?,
        None => return Err(SpecError::Missing("user")),
    };
    for (k, v) in pairs(rest, KEYS)? {
        match k.as_str() {
            "restrict" => p.restrict = on_off(&k, &v)?,
            "link-local" => p.link_local = on_off(&k, &v)?,
            _ => {
                p.host_loopback = match on_off(&k, &v) {
                    Ok(true) => HostLoopback::All,
                    Ok(false) => HostLoopback::None,
                    Err(_) => HostLoopback::Ports(
                        v.split('/')
                            .map(|p| p.parse::<u16>().ok().filter(|&p| p > 0))
                            .collect::<Option<Vec<u16>>>()
                            .ok_or_else(|| SpecError::BadValue {
                                key: k.clone(),
                                value: v.clone(),
                                expected: "on, off or host ports: PORT/PORT/...",
                            })?,
                    ),
                }
            }
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs() {
        let d = parse_disk("path=/a.img").unwrap();
        assert_eq!(d.path, PathBuf::from("/a.img"));
        assert!(!d.readonly);
        assert_eq!(d.cache, CacheMode::Writeback);
        let d = parse_disk("path=x,readonly=on,cache=unsafe,serial=abc").unwrap();
        assert!(d.readonly);
        assert_eq!(d.cache, CacheMode::Unsafe);
        assert_eq!(d.serial, "abc");
    }

    #[test]
    fn bad_disk_specs_say_what_is_wrong() {
        assert_eq!(parse_disk("readonly=on"), Err(SpecError::Missing("path")));
        assert_eq!(
            parse_disk("/a.img"),
            Err(SpecError::NotKeyValue("/a.img".into()))
        );
        assert!(matches!(
            parse_disk("path=a,ro=on"),
            Err(SpecError::UnknownKey { .. })
        ));
        assert_eq!(
            parse_disk("path=a,path=b"),
            Err(SpecError::Duplicate("path".into()))
        );
        assert!(matches!(
            parse_disk("path=a,cache=none"),
            Err(SpecError::BadValue { .. })
        ));
        assert!(matches!(
            parse_disk("path=a,readonly=maybe"),
            Err(SpecError::BadValue { .. })
        ));
        assert!(matches!(
            parse_disk("path=a,serial=012345678901234567890"),
            Err(SpecError::BadValue { .. })
        ));
    }

    #[test]
    fn tap_specs() {
        assert_eq!(parse_tap("tap=tap0"), Ok(("tap0".into(), None)));
        assert_eq!(
            parse_tap("tap=t1,guest-ip=192.168.100.2"),
            Ok(("t1".into(), Some(std::net::Ipv4Addr::new(192, 168, 100, 2))))
        );
        assert!(matches!(
            parse_tap("tap=t1,guest-ip=fe80::1"),
            Err(SpecError::BadValue { .. })
        ));
        assert_eq!(parse_tap("tap="), Err(SpecError::Missing("tap")));
        assert_eq!(
            parse_tap("guest-ip=10.0.0.2"),
            Err(SpecError::Missing("tap"))
        );
        for bad in [
            "tap=t\";x",
            "tap=a b",
            "tap=t{",
            "tap=..",
            "tap=x234567890123456",
        ] {
            assert!(
                matches!(parse_tap(bad), Err(SpecError::InterfaceName(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_tap("tap=t1,mac=x"),
            Err(SpecError::UnknownKey { .. })
        ));
    }

    #[test]
    fn user_specs() {
        use tandem_net::user::{HostLoopback, Policy};
        assert_eq!(parse_user("user"), Ok(Policy::default()));
        assert_eq!(
            parse_user("user,restrict=on,host-loopback=off,link-local=on"),
            Ok(Policy {
                restrict: true,
                host_loopback: HostLoopback::None,
                link_local: true,
            })
        );
        assert_eq!(
            parse_user("user,host-loopback=8000/8001").map(|p| p.host_loopback),
            Ok(HostLoopback::Ports(vec![8000, 8001]))
        );
        for bad in [
            "user,restrict=maybe",
            "user,host-loopback=0",
            "user,host-loopback=8000/x",
            "user,host-loopback=",
            "user,link-local=1",
        ] {
            assert!(
                matches!(parse_user(bad), Err(SpecError::BadValue { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_user("user,mac=x"),
            Err(SpecError::UnknownKey { .. })
        ));
        assert_eq!(
            parse_user("user,restrict=on,restrict=off"),
            Err(SpecError::Duplicate("restrict".into()))
        );
        assert_eq!(
            parse_user("user,"),
            Err(SpecError::NotKeyValue(String::new()))
        );
    }

    #[test]
    fn channel_specs() {
        let c = parse_channel("path=/dev/shm/c,size=1M,id=2").unwrap();
        assert_eq!(c.path, PathBuf::from("/dev/shm/c"));
        assert_eq!(c.size, 1 << 20);
        assert_eq!(c.peer_id, 2);
        assert_eq!(parse_channel("path=/x,size=64K").unwrap().peer_id, 0);
        assert_eq!(parse_channel("path=/x"), Err(SpecError::Missing("size")));
        assert_eq!(parse_channel("size=1M"), Err(SpecError::Missing("path")));
        assert!(matches!(
            parse_channel("path=/x,size=lots"),
            Err(SpecError::BadValue { .. })
        ));
        assert!(matches!(
            parse_channel("path=/x,size=1M,id=70000"),
            Err(SpecError::BadValue { .. })
        ));
        assert_eq!(
            parse_channel("path=/x,size=1M,doorbells=5/6")
                .unwrap()
                .doorbells,
            [5, 6]
        );
        // Standard streams, and one descriptor for two peers, are refused.
        for bad in ["0/6", "5/2", "5/5", "5/x", "-1/4"] {
            assert!(
                matches!(
                    parse_channel(&format!("path=/x,size=1M,doorbells={bad}")),
                    Err(SpecError::BadValue { .. })
                ),
                "{bad}"
            );
        }
    }
}
