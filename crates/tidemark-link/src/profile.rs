//! Sizing QUIC flow-control windows and UDP socket buffers from the link's bandwidth and RTT.
//!
//! A sender can have at most one flow-control window of unacknowledged data in flight, so a
//! window smaller than the bandwidth-delay product caps throughput at `window / rtt`: quinn's
//! default 1.25 MB stream window allows about 200 Mbit/s on a 50 ms link. The windows here are
//! twice the bandwidth-delay product, so that a loss recovery or a slow reader does not stall
//! the sender, bounded below by quinn's defaults and above by named maxima.

use std::time::Duration;

/// Smallest stream receive window: quinn's default (100 Mbit/s × 100 ms).
pub const STREAM_WINDOW_BYTES_MIN: u64 = 1_250_000;
/// Largest stream receive window: bounds the memory one stream can make the receiver buffer.
pub const STREAM_WINDOW_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// How many streams can run at full speed at once: the connection window is this many stream
/// windows, so that for example a baseline and the journal stream do not starve each other.
pub const CONNECTION_WINDOW_STREAMS: u64 = 2;
/// Largest connection receive window and send window: bounds one connection's buffered bytes.
pub const CONNECTION_WINDOW_BYTES_MAX: u64 = 512 * 1024 * 1024;
/// Smallest UDP socket buffer requested, for bursts on fast local links.
pub const SOCKET_BUFFER_BYTES_MIN: u64 = 4 * 1024 * 1024;
/// Largest UDP socket buffer requested.
pub const SOCKET_BUFFER_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Headroom over the bandwidth-delay product.
pub const WINDOW_HEADROOM_FACTOR: u64 = 2;

/// The link a site replicates over, used to size windows and buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkProfile {
    /// The link's bandwidth, in bits per second.
    pub bandwidth_bits_per_second: u64,
    /// The link's round-trip time.
    pub rtt: Duration,
    /// How the sender paces itself.
    pub congestion: CongestionControl,
}

impl Default for LinkProfile {
    /// 1 Gbit/s with 50 ms round trip: a fast cross-country WAN; BBR.
    fn default() -> LinkProfile {
        LinkProfile {
            bandwidth_bits_per_second: 1_000_000_000,
            rtt: Duration::from_millis(50),
            congestion: CongestionControl::Bbr,
        }
    }
}

/// The congestion controller of the link's QUIC connections.
///
/// BBR is the default because a WAN loses packets that no queue dropped: with 0.1% random loss
/// and a 50 ms round trip, Cubic (which halves its window at every loss) was measured at 5% of
/// a 200 Mbit/s link, BBR (which paces to the measured bottleneck rate) at over 80%
/// (docs/benchmarks.md). Cubic remains for links shared with other traffic that must be treated
/// the way TCP treats it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CongestionControl {
    /// Model-based pacing (quinn's BBR).
    Bbr,
    /// Loss-based (quinn's Cubic), as TCP does.
    Cubic,
}

/// The window and buffer sizes derived from a [`LinkProfile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// The link's bandwidth-delay product, in bytes.
    pub bandwidth_delay_bytes: u64,
    /// Bytes one stream may have in flight towards us (QUIC `initial_max_stream_data`).
    pub stream_receive_window_bytes: u64,
    /// Bytes all streams of a connection may have in flight towards us (QUIC `initial_max_data`).
    pub connection_receive_window_bytes: u64,
    /// Bytes we buffer for sending and retransmission per connection.
    pub send_window_bytes: u64,
    /// UDP socket receive and send buffer size requested from the kernel.
    pub socket_buffer_bytes: u64,
}

impl LinkProfile {
    /// The bandwidth-delay product in bytes: what must be in flight to fill the link.
    pub fn bandwidth_delay_bytes(&self) -> u64 {
        let bits = u128::from(self.bandwidth_bits_per_second) * self.rtt.as_nanos();
        let bytes = bits / 8 / 1_000_000_000;
        u64::try_from(bytes).unwrap_or(u64::MAX)
    }

    /// The windows and buffers for this link.
    pub fn windows(&self) -> Windows {
        let bandwidth_delay_bytes = self.bandwidth_delay_bytes();
        let wanted = bandwidth_delay_bytes.saturating_mul(WINDOW_HEADROOM_FACTOR);
        let stream_receive_window_bytes = wanted.clamp(STREAM_WINDOW_BYTES_MIN, STREAM_WINDOW_BYTES_MAX);
        let connection_receive_window_bytes = stream_receive_window_bytes
            .saturating_mul(CONNECTION_WINDOW_STREAMS)
            .min(CONNECTION_WINDOW_BYTES_MAX);
        let socket_buffer_bytes = wanted.clamp(SOCKET_BUFFER_BYTES_MIN, SOCKET_BUFFER_BYTES_MAX);
        Windows {
            bandwidth_delay_bytes,
            stream_receive_window_bytes,
            connection_receive_window_bytes,
            send_window_bytes: connection_receive_window_bytes,
            socket_buffer_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_profile_windows() {
        let w = LinkProfile::default().windows();
        assert_eq!(w.bandwidth_delay_bytes, 6_250_000);
        assert_eq!(w.stream_receive_window_bytes, 12_500_000);
        assert_eq!(w.connection_receive_window_bytes, 25_000_000);
        assert_eq!(w.send_window_bytes, 25_000_000);
        assert_eq!(w.socket_buffer_bytes, 12_500_000);
    }

    #[test]
    fn slower_link_windows() {
        let profile = LinkProfile {
            bandwidth_bits_per_second: 200_000_000,
            rtt: Duration::from_millis(50),
            congestion: CongestionControl::Bbr,
        };
        let w = profile.windows();
        assert_eq!(w.bandwidth_delay_bytes, 1_250_000);
        assert_eq!(w.stream_receive_window_bytes, 2_500_000);
        assert_eq!(w.connection_receive_window_bytes, 5_000_000);
        assert_eq!(w.socket_buffer_bytes, SOCKET_BUFFER_BYTES_MIN);
    }

    #[test]
    fn windows_are_bounded() {
        let tiny = LinkProfile {
            bandwidth_bits_per_second: 1_000_000,
            rtt: Duration::from_millis(1),
            congestion: CongestionControl::Bbr,
        }
        .windows();
        assert_eq!(tiny.stream_receive_window_bytes, STREAM_WINDOW_BYTES_MIN);
        let huge = LinkProfile {
            bandwidth_bits_per_second: u64::MAX,
            rtt: Duration::from_secs(3600),
            congestion: CongestionControl::Bbr,
        }
        .windows();
        assert_eq!(huge.stream_receive_window_bytes, STREAM_WINDOW_BYTES_MAX);
        assert_eq!(huge.connection_receive_window_bytes, CONNECTION_WINDOW_BYTES_MAX);
        assert_eq!(huge.socket_buffer_bytes, SOCKET_BUFFER_BYTES_MAX);
        let zero = LinkProfile {
            bandwidth_bits_per_second: 0,
            rtt: Duration::ZERO,
            congestion: CongestionControl::Bbr,
        }
        .windows();
        assert_eq!(zero.bandwidth_delay_bytes, 0);
        assert_eq!(zero.stream_receive_window_bytes, STREAM_WINDOW_BYTES_MIN);
    }
}
