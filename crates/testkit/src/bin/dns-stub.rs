//! `dns-stub ADDR:PORT IPV4`: a DNS server for tests that answers every A query with IPV4 (TTL
//! 60) and every other query with an empty answer. Runs until killed.

use std::net::{Ipv4Addr, UdpSocket};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: dns-stub ADDR:PORT IPV4");
        std::process::exit(2);
    }
    let sock = UdpSocket::bind(&args[1]).expect("bind");
    let answer: Ipv4Addr = args[2].parse().expect("IPv4 address");
    let mut buf = [0u8; 512];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Some(reply) = respond(&buf[..n], answer) {
            let _ = sock.send_to(&reply, from);
        }
    }
}

/// The reply to one query: the question echoed, one A record when the query asks for one.
fn respond(q: &[u8], answer: Ipv4Addr) -> Option<Vec<u8>> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut i = 12;
    while *q.get(i)? != 0 {
        i += 1 + usize::from(q[i]);
    }
    let qtype = u16::from_be_bytes([*q.get(i + 1)?, *q.get(i + 2)?]);
    let end = i + 5;
    let question = q.get(12..end)?;
    let is_a = qtype == 1;
    let mut r = Vec::with_capacity(end + 16);
    r.extend_from_slice(&q[0..2]); // id
    r.extend_from_slice(&[0x81, 0x80]); // response, recursion desired and available
    r.extend_from_slice(&1u16.to_be_bytes()); // questions
    r.extend_from_slice(&u16::from(is_a).to_be_bytes()); // answers
    r.extend_from_slice(&[0, 0, 0, 0]); // authority, additional
    r.extend_from_slice(question);
    if is_a {
        r.extend_from_slice(&[0xc0, 0x0c]); // name: pointer to the question
        r.extend_from_slice(&[0, 1, 0, 1]); // A, IN
        r.extend_from_slice(&60u32.to_be_bytes());
        r.extend_from_slice(&4u16.to_be_bytes());
        r.extend_from_slice(&answer.octets());
    }
    Some(r)
}
