//! Adds an IPv6 address to `lo` with one rtnetlink request, so the init image needs no `ip`
//! binary. Used for `::6/128`, the inbound proxy's IPv6 delivery source, which unlike
//! 127.0.0.6 is not local until it is added.
//!
//! The message is built by [`new_address`] (pure, tested byte for byte) and sent over a plain
//! `AF_NETLINK` socket; the kernel's acknowledgement is read by [`check_ack`].

use std::io::{self, Read, Write};
use std::net::Ipv6Addr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

// From linux/netlink.h, linux/rtnetlink.h and linux/if_addr.h.
const AF_NETLINK: i32 = 16;
const NETLINK_ROUTE: i32 = 0;
const AF_INET6: u8 = 10;
const NLMSG_ERROR: u16 = 2;
const RTM_NEWADDR: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const IFA_ADDRESS: u16 = 1;
const IFA_FLAGS: u16 = 8;
const IFA_F_NODAD: u32 = 0x02;
const IFA_F_PERMANENT: u32 = 0x80;
const EEXIST: i32 = 17;
const HEADER_LEN: usize = 16;

/// The kernel gives the loopback device index 1 in every network namespace
/// (`LOOPBACK_IFINDEX`), so no lookup by name is needed.
pub const LOOPBACK_INDEX: u32 = 1;

/// An `RTM_NEWADDR` request for `addr/prefix` on interface `index`, without duplicate address
/// detection (a loopback address has no neighbours, and DAD would leave it unusable at first).
pub fn new_address(addr: Ipv6Addr, prefix: u8, index: u32, seq: u32) -> Vec<u8> {
    let flags = IFA_F_NODAD | IFA_F_PERMANENT;
    let mut msg = Vec::with_capacity(52);
    // nlmsghdr; the length is filled in at the end.
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&RTM_NEWADDR.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // ifaddrmsg: family, prefix length, flags (the low 8 bits), scope (global), index.
    msg.extend_from_slice(&[AF_INET6, prefix, flags.to_le_bytes()[0], 0]);
    msg.extend_from_slice(&index.to_ne_bytes());
    // rtattr IFA_ADDRESS, then IFA_FLAGS (the full 32-bit flags).
    msg.extend_from_slice(&20u16.to_ne_bytes());
    msg.extend_from_slice(&IFA_ADDRESS.to_ne_bytes());
    msg.extend_from_slice(&addr.octets());
    msg.extend_from_slice(&8u16.to_ne_bytes());
    msg.extend_from_slice(&IFA_FLAGS.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    let len = u32::try_from(msg.len()).unwrap_or(u32::MAX);
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    msg
}

/// Reads the kernel's answer to request `seq`: success, or the address already being there
/// (a re-run), is `Ok`; any other error is the kernel's errno.
pub fn check_ack(reply: &[u8], seq: u32) -> io::Result<()> {
    let mut rest = reply;
    while rest.len() >= HEADER_LEN {
        let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let len = u32_at(rest, 0) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < HEADER_LEN || len > rest.len() {
            break;
        }
        if kind == NLMSG_ERROR && u32_at(rest, 8) == seq && len >= HEADER_LEN + 4 {
            let errno = i32::from_ne_bytes([rest[16], rest[17], rest[18], rest[19]]);
            return match errno {
                0 => Ok(()),
                e if e == -EEXIST => Ok(()),
                e => Err(io::Error::from_raw_os_error(-e)),
            };
        }
        // Messages are aligned to 4 bytes.
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "no acknowledgement from the kernel",
    ))
}

/// Adds `addr/128` to `lo` in the current network namespace; already present is fine.
pub fn add_loopback_address(addr: Ipv6Addr) -> io::Result<()> {
    let socket = Socket::new(
        Domain::from(AF_NETLINK),
        Type::RAW,
        Some(Protocol::from(NETLINK_ROUTE)),
    )?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    // Unbound and unconnected, a netlink socket is bound on first send and sends to the
    // kernel (port 0), which answers to the socket's own port.
    let seq = 1;
    (&socket).write_all(&new_address(addr, 128, LOOPBACK_INDEX, seq))?;
    let mut reply = [0u8; 1024];
    let n = (&socket).read(&mut reply)?;
    check_ack(&reply[..n], seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_address_message() {
        let msg = new_address("::6".parse().unwrap(), 128, 1, 7);
        let mut want = Vec::new();
        want.extend_from_slice(&52u32.to_ne_bytes());
        want.extend_from_slice(&20u16.to_ne_bytes());
        want.extend_from_slice(&0x605u16.to_ne_bytes());
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[10, 128, 0x82, 0]);
        want.extend_from_slice(&1u32.to_ne_bytes());
        want.extend_from_slice(&20u16.to_ne_bytes());
        want.extend_from_slice(&1u16.to_ne_bytes());
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6]);
        want.extend_from_slice(&8u16.to_ne_bytes());
        want.extend_from_slice(&8u16.to_ne_bytes());
        want.extend_from_slice(&0x82u32.to_ne_bytes());
        assert_eq!(msg, want);
    }

    fn error_message(seq: u32, errno: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&errno.to_ne_bytes());
        m.extend_from_slice(&[0u8; 16]); // the request's header, echoed
        m
    }

    #[test]
    fn acknowledgements() {
        assert!(check_ack(&error_message(3, 0), 3).is_ok());
        assert!(check_ack(&error_message(3, -EEXIST), 3).is_ok());
        let denied = check_ack(&error_message(3, -1), 3).unwrap_err();
        assert_eq!(denied.raw_os_error(), Some(1));
        // Another request's answer, a truncated message and nothing at all are no answer.
        let mut two = error_message(2, -13);
        two.extend(error_message(3, 0));
        assert!(check_ack(&two, 3).is_ok());
        assert!(check_ack(&error_message(2, 0), 3).is_err());
        assert!(check_ack(&error_message(3, 0)[..20], 3).is_err());
        assert!(check_ack(&[], 3).is_err());
    }
}
