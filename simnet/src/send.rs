//! Sending a delivery thread's datagrams. Consecutive datagrams of one size to one destination go
//! out in one `sendmsg` with UDP generic segmentation offload (GSO) where Linux offers it: the
//! kernel splits them back into the same datagrams, so they cross the network stack once instead
//! of once each, which is most of the cost of relaying on loopback. Where GSO is missing or
//! refused, datagrams go one by one.

use std::io::{self, IoSlice};
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

/// How often a send that found the socket's buffer full is retried.
const SEND_RETRIES_MAX: u32 = 100;
/// How long to wait between those retries.
const SEND_RETRY_PAUSE: Duration = Duration::from_micros(20);
/// Most datagrams in one GSO send: the kernel's `UDP_MAX_SEGMENTS`.
pub(crate) const GSO_SEGMENTS_MAX: usize = 64;
/// Most payload bytes in one GSO send, under IPv4's 65 507 byte limit for one UDP send.
const GSO_BYTES_MAX: usize = 65_000;

/// Whether GSO is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gso {
    /// Tried first for every group of two or more datagrams.
    Enabled,
    /// The kernel refused it once; datagrams go one by one from then on.
    Disabled,
}

/// Sends groups of datagrams, remembering whether the kernel takes GSO.
pub(crate) struct Sender {
    gso: Gso,
}

/// What became of a group of datagrams.
#[derive(Debug, Default)]
pub(crate) struct Sent {
    /// Datagrams sent.
    pub(crate) sent_packets: u64,
    /// Datagrams the kernel refused, and the last reason.
    pub(crate) failed_packets: u64,
    pub(crate) last_error: Option<io::Error>,
}

impl Sender {
    pub(crate) fn new() -> Sender {
        Sender {
            gso: if cfg!(all(target_os = "linux", target_pointer_width = "64")) {
                Gso::Enabled
            } else {
                Gso::Disabled
            },
        }
    }

    /// How many datagrams of `len_bytes` can go in one send.
    pub(crate) fn segments_per_send(&self, len_bytes: usize) -> usize {
        match self.gso {
            Gso::Enabled if len_bytes > 0 => (GSO_BYTES_MAX / len_bytes).clamp(1, GSO_SEGMENTS_MAX),
            _ => 1,
        }
    }

    /// Send `payloads`, which all have the same length, on `socket`: to `to`, or to the address
    /// the socket is connected to.
    pub(crate) fn send(&mut self, socket: &UdpSocket, to: Option<SocketAddr>, payloads: &[&[u8]]) -> Sent {
        if let [single] = payloads {
            return one_by_one(socket, to, &[single]);
        }
        if self.gso == Gso::Enabled {
            match with_retries(|| send_segments(socket, to, payloads)) {
                Ok(()) => return Sent { sent_packets: payloads.len() as u64, ..Sent::default() },
                // EIO: no checksum offload; EINVAL: segments bigger than the path's MTU;
                // EOPNOTSUPP: no UDP_SEGMENT. None of these will change.
                Err(error) if matches!(error.raw_os_error(), Some(5 | 22 | 95)) => {
                    tracing::info!(%error, "simnet: the kernel refused UDP GSO; sending datagrams one by one");
                    self.gso = Gso::Disabled;
                }
                // Probably about the destination (a closed port): one by one says which.
                Err(_) => {}
            }
        }
        one_by_one(socket, to, payloads)
    }
}

/// Send each payload with its own system call.
fn one_by_one(socket: &UdpSocket, to: Option<SocketAddr>, payloads: &[&[u8]]) -> Sent {
    let mut sent = Sent::default();
    for payload in payloads {
        let result = with_retries(|| {
            match to {
                Some(addr) => socket.send_to(payload, addr),
                None => socket.send(payload),
            }
            .map(drop)
        });
        match result {
            Ok(()) => sent.sent_packets += 1,
            Err(error) => {
                sent.failed_packets += 1;
                sent.last_error = Some(error);
            }
        }
    }
    sent
}

/// Run `send`, retrying briefly while the socket's buffer is full.
fn with_retries(mut send: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    let mut retries = 0;
    loop {
        match send() {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock && retries < SEND_RETRIES_MAX => {
                retries += 1;
                std::thread::sleep(SEND_RETRY_PAUSE);
            }
            Err(error) => return Err(error),
        }
    }
}

/// Send same-sized `payloads` in one `sendmsg` with a `UDP_SEGMENT` control message.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn send_segments(socket: &UdpSocket, to: Option<SocketAddr>, payloads: &[&[u8]]) -> io::Result<()> {
    let segment_bytes = payloads.first().map_or(0, |payload| payload.len());
    let segment_bytes = u16::try_from(segment_bytes).map_err(|_| io::Error::from_raw_os_error(22))?;
    let control = udp_segment_control(segment_bytes);
    let buffers: Vec<IoSlice<'_>> = payloads.iter().map(|payload| IoSlice::new(payload)).collect();
    let socket = socket2::SockRef::from(socket);
    let message = socket2::MsgHdr::new().with_buffers(&buffers).with_control(&control);
    match to {
        Some(addr) => {
            let addr = socket2::SockAddr::from(addr);
            socket.sendmsg(&message.with_addr(&addr), 0)
        }
        None => socket.sendmsg(&message, 0),
    }
    .map(drop)
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn send_segments(_: &UdpSocket, _: Option<SocketAddr>, _: &[&[u8]]) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// The control message that sets the GSO segment size, laid out as Linux's 64-bit `cmsghdr`
/// (`cmsg_len: usize`, `cmsg_level: i32`, `cmsg_type: i32`) followed by the `u16` size and
/// padding to the next multiple of 8 (`CMSG_SPACE(2)`). The kernel copies control messages
/// into an aligned buffer of its own, so this one needs no alignment.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn udp_segment_control(segment_bytes: u16) -> [u8; 24] {
    /// `SOL_UDP`: the control message is for the UDP layer.
    const SOL_UDP: i32 = 17;
    /// `UDP_SEGMENT` from `linux/udp.h`.
    const UDP_SEGMENT: i32 = 103;
    /// `CMSG_LEN(2)`: the header and the data, without trailing padding.
    const CMSG_LEN: usize = 16 + 2;
    let mut control = [0_u8; 24];
    let fields: [&[u8]; 4] = [
        &CMSG_LEN.to_ne_bytes(),
        &SOL_UDP.to_ne_bytes(),
        &UDP_SEGMENT.to_ne_bytes(),
        &segment_bytes.to_ne_bytes(),
    ];
    let mut at = 0;
    for field in fields {
        if let Some(slot) = control.get_mut(at..at + field.len()) {
            slot.copy_from_slice(field);
        }
        at += field.len();
    }
    control
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Send `count` datagrams of `len` bytes as one group and read them back one by one.
    fn round_trip(count: usize, len: usize, connected: bool) -> (Sent, Vec<Vec<u8>>) {
        let receiver = UdpSocket::bind("127.0.0.1:0").expect("bind");
        receiver.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let sender_socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let target = receiver.local_addr().expect("address");
        let to = if connected {
            sender_socket.connect(target).expect("connect");
            None
        } else {
            Some(target)
        };
        let payloads: Vec<Vec<u8>> = (0..count).map(|index| vec![index as u8; len]).collect();
        let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        let mut sender = Sender::new();
        let sent = sender.send(&sender_socket, to, &slices);
        // Linux has had UDP GSO since 4.18; if this fails, the kernel refused it and the relay
        // is slower than it should be.
        if cfg!(all(target_os = "linux", target_pointer_width = "64")) {
            assert_eq!(sender.gso, Gso::Enabled, "the kernel refused UDP GSO");
        }
        let mut received = Vec::new();
        let mut buffer = vec![0_u8; 65_536];
        for _ in 0..sent.sent_packets {
            let len = receiver.recv(&mut buffer).expect("a datagram");
            received.push(buffer.get(..len).expect("within the buffer").to_vec());
        }
        (sent, received)
    }

    #[test]
    fn a_group_arrives_as_the_same_separate_datagrams() {
        for connected in [false, true] {
            let (sent, received) = round_trip(10, 1400, connected);
            assert_eq!(sent.sent_packets, 10, "{:?}", sent.last_error);
            let expected: Vec<Vec<u8>> = (0..10).map(|index| vec![index as u8; 1400]).collect();
            assert_eq!(received, expected, "same datagrams, same order, same boundaries");
        }
    }

    #[test]
    fn single_and_large_datagrams_go_one_by_one() {
        let sender = Sender::new();
        assert_eq!(sender.segments_per_send(60_000), 1);
        assert_eq!(sender.segments_per_send(0), 1);
        let (sent, received) = round_trip(1, 60_000, true);
        assert_eq!((sent.sent_packets, received.len()), (1, 1));
    }

    #[test]
    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    fn the_control_message_has_linux_layout() {
        let control = udp_segment_control(1400);
        assert_eq!(control.get(..8), Some(&18_usize.to_ne_bytes()[..]));
        assert_eq!(control.get(8..12), Some(&17_i32.to_ne_bytes()[..]));
        assert_eq!(control.get(12..16), Some(&103_i32.to_ne_bytes()[..]));
        assert_eq!(control.get(16..18), Some(&1400_u16.to_ne_bytes()[..]));
        assert!(control.get(18..).is_some_and(|padding| padding.iter().all(|&byte| byte == 0)));
    }
}
