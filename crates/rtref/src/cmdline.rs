//! The guest's command line: space-separated `key=value` words; unknown words are ignored (the
//! same command line may carry words meant for something else).

use core::fmt;

/// Default period of the periodic task, in microseconds.
pub const DEFAULT_PERIOD_US: u64 = 1000;
/// Default run time, in seconds.
pub const DEFAULT_DURATION_S: u64 = 10;
/// Shortest period accepted, in microseconds (below it the guest measures its own interrupt
/// path more than the host).
pub const MIN_PERIOD_US: u64 = 10;
/// Longest run accepted, in seconds (one day).
pub const MAX_DURATION_S: u64 = 86_400;

/// Default number of round trips in ping-pong mode.
pub const DEFAULT_ROUNDS: u32 = 10_000;

/// Which side of a doorbell ping-pong this guest plays (`pingpong=ping|pong`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Rings the peer, waits for its reply, `rounds` times; then reports and powers off.
    Ping,
    /// Rings the peer back for every doorbell, until the ping side says it is done.
    Pong,
}

/// A doorbell ping-pong over the channel's MSI-X vector, instead of the periodic task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingPong {
    /// This guest's side.
    pub role: Role,
    /// Round trips the ping side makes (`rounds=`, default [`DEFAULT_ROUNDS`]).
    pub rounds: u32,
    /// The other side's peer ID (`peer=`, required).
    pub peer: u16,
}

/// What the command line asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Period of the task, in nanoseconds (`period_us=`).
    pub period_ns: u64,
    /// Run time, in nanoseconds (`duration_s=`).
    pub duration_ns: u64,
    /// Print a progress line every this many ticks; 0: never (`report_every=`).
    pub report_every: u64,
    /// Publish live figures to the channel every this many ticks (`publish_every=`, default 1).
    pub publish_every: u64,
    /// Ring this peer's doorbell after each publication (`bell=PEER`).
    pub bell: Option<u16>,
    /// Play a doorbell ping-pong instead of the periodic task (`pingpong=`, `rounds=`, `peer=`).
    pub pingpong: Option<PingPong>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            period_ns: DEFAULT_PERIOD_US * 1000,
            duration_ns: DEFAULT_DURATION_S * 1_000_000_000,
            report_every: 0,
            publish_every: 1,
            bell: None,
            pingpong: None,
        }
    }
}

impl Config {
    /// The number of deadlines in the run: `duration / period`, rounded down. Deadlines are
    /// absolute (`start + k * period`), so this is exactly the number of ticks handled.
    pub fn ticks(&self) -> u64 {
        self.duration_ns / self.period_ns
    }

    /// Parses `cmdline`.
    pub fn parse(cmdline: &str) -> Result<Self, CmdlineError<'_>> {
        let mut c = Self::default();
        let (mut role, mut rounds, mut peer) = (None, DEFAULT_ROUNDS, None);
        for word in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let num = || -> Result<u64, CmdlineError<'_>> {
                value.parse().map_err(|_| CmdlineError::NotANumber(word))
            };
            match key {
                "period_us" => {
                    let us = num()?;
                    if !(MIN_PERIOD_US..=u64::MAX / 1000).contains(&us) {
                        return Err(CmdlineError::OutOfRange(word));
                    }
                    c.period_ns = us * 1000;
                }
                "duration_s" => {
                    let s = num()?;
                    if !(1..=MAX_DURATION_S).contains(&s) {
                        return Err(CmdlineError::OutOfRange(word));
                    }
                    c.duration_ns = s * 1_000_000_000;
                }
                "report_every" => c.report_every = num()?,
                "publish_every" => {
                    c.publish_every = num()?;
                    if c.publish_every == 0 {
                        return Err(CmdlineError::OutOfRange(word));
                    }
                }
                "bell" => {
                    let peer = num()?;
                    c.bell = Some(u16::try_from(peer).map_err(|_| CmdlineError::OutOfRange(word))?);
                }
                "pingpong" => {
                    role = Some(match value {
                        "ping" => Role::Ping,
                        "pong" => Role::Pong,
                        _ => return Err(CmdlineError::BadValue(word)),
                    })
                }
                "rounds" => {
                    rounds = u32::try_from(num()?)
                        .ok()
                        .filter(|&r| r != 0)
                        .ok_or(CmdlineError::OutOfRange(word))?;
                }
                "peer" => {
                    peer = Some(u16::try_from(num()?).map_err(|_| CmdlineError::OutOfRange(word))?);
                }
                _ => {}
            }
        }
        if c.ticks() == 0 {
            return Err(CmdlineError::NoTicks);
        }
        if let Some(role) = role {
            let peer = peer.ok_or(CmdlineError::NoPeer)?;
            c.pingpong = Some(PingPong { role, rounds, peer });
        }
        Ok(c)
    }
}

/// A command line the guest cannot run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    /// `key=value` whose value is not a decimal number.
    NotANumber(&'a str),
    /// `key=value` whose value is outside the accepted range.
    OutOfRange(&'a str),
    /// The duration is shorter than one period.
    NoTicks,
    /// `key=value` whose value is none of those the key takes.
    BadValue(&'a str),
    /// `pingpong=` without `peer=`.
    NoPeer,
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotANumber(w) => write!(f, "{w}: not a number"),
            Self::OutOfRange(w) => write!(
                f,
                "{w}: out of range (period_us >= {MIN_PERIOD_US}, 1 <= duration_s <= {MAX_DURATION_S}, publish_every >= 1, bell and peer <= 65535, 1 <= rounds <= {})",
                u32::MAX
            ),
            Self::BadValue(w) => write!(f, "{w}: pingpong takes ping or pong"),
            Self::NoPeer => write!(f, "pingpong needs peer=ID (the other side's peer ID)"),
            Self::NoTicks => write!(f, "the duration is shorter than one period"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_our_words() {
        let c = Config::parse("console=ttyS0 quiet").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(
            (c.period_ns, c.duration_ns, c.ticks()),
            (1_000_000, 10_000_000_000, 10_000)
        );
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn values_are_read() {
        let c =
            Config::parse("  period_us=2000 duration_s=2 report_every=100 bell=3 publish_every=10")
                .unwrap();
        assert_eq!(c.period_ns, 2_000_000);
        assert_eq!(c.duration_ns, 2_000_000_000);
        assert_eq!(c.ticks(), 1000);
        assert_eq!(
            (c.report_every, c.publish_every, c.bell),
            (100, 10, Some(3))
        );
        // A period that does not divide the duration: the deadlines that fit.
        assert_eq!(
            Config::parse("period_us=300 duration_s=1").unwrap().ticks(),
            3333
        );
    }

    #[test]
    fn bad_values_are_errors_naming_the_word() {
        assert_eq!(
            Config::parse("period_us=fast"),
            Err(CmdlineError::NotANumber("period_us=fast"))
        );
        assert_eq!(
            Config::parse("period_us=-1"),
            Err(CmdlineError::NotANumber("period_us=-1"))
        );
        for bad in [
            "period_us=5",
            "duration_s=0",
            "duration_s=86401",
            "bell=65536",
            "publish_every=0",
        ] {
            assert_eq!(
                Config::parse(bad),
                Err(CmdlineError::OutOfRange(bad)),
                "{bad}"
            );
        }
        assert_eq!(
            Config::parse("period_us=99999999999999999999"),
            Err(CmdlineError::NotANumber("period_us=99999999999999999999"))
        );
        assert_eq!(
            Config::parse("period_us=18446744073709552"),
            Err(CmdlineError::OutOfRange("period_us=18446744073709552"))
        );
        assert_eq!(
            Config::parse("period_us=2000000 duration_s=1"),
            Err(CmdlineError::NoTicks)
        );
        let msg = std::format!("{}", CmdlineError::OutOfRange("period_us=5"));
        assert!(msg.starts_with("period_us=5: out of range"), "{msg}");
    }

    #[test]
    fn pingpong_is_read() {
        assert_eq!(Config::parse("bell=1").unwrap().pingpong, None);
        let c = Config::parse("pingpong=ping rounds=20000 peer=1").unwrap();
        assert_eq!(
            c.pingpong,
            Some(PingPong {
                role: Role::Ping,
                rounds: 20_000,
                peer: 1
            })
        );
        assert_eq!(
            Config::parse("peer=0 pingpong=pong").unwrap().pingpong,
            Some(PingPong {
                role: Role::Pong,
                rounds: DEFAULT_ROUNDS,
                peer: 0
            })
        );
        // The periodic task's words are still checked.
        assert_eq!(
            Config::parse("pingpong=ping peer=1 period_us=5"),
            Err(CmdlineError::OutOfRange("period_us=5"))
        );
    }

    #[test]
    fn bad_pingpong_words_are_errors() {
        assert_eq!(
            Config::parse("pingpong=pang peer=1"),
            Err(CmdlineError::BadValue("pingpong=pang"))
        );
        assert_eq!(Config::parse("pingpong=ping"), Err(CmdlineError::NoPeer));
        for bad in ["rounds=0", "rounds=4294967296", "peer=65536"] {
            assert_eq!(
                Config::parse(&std::format!("pingpong=ping peer=1 {bad}")),
                Err(CmdlineError::OutOfRange(bad)),
                "{bad}"
            );
        }
        assert_eq!(
            Config::parse("pingpong=pong peer=x"),
            Err(CmdlineError::NotANumber("peer=x"))
        );
        let msg = std::format!("{}", CmdlineError::NoPeer);
        assert!(msg.contains("peer="), "{msg}");
    }
}
