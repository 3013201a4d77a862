//! UDP sockets for QUIC endpoints that carry many connections, and the
//! path-MTU search every connection (node and client side) runs.

use std::net::SocketAddr;

/// UDP socket buffer size asked for; the kernel caps it at its
/// `rmem_max`/`wmem_max`.
const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// A UDP socket bound to `addr` with enlarged buffers: quinn does not size
/// them, and with the kernel default (~208 KiB) one broadcast to a few
/// hundred connections of one socket overflows the receive queue, so the
/// kernel drops packets that QUIC then has to detect and resend.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Smallest MTU gain worth another probe. quinn's default (20 bytes) makes
/// its binary search between 1,200 and 1,452 bytes send four probes in each
/// direction, each a full-size packet plus an acknowledgment: 16 of the ~28
/// datagrams a connection's setup costs on loopback (BENCHMARKS.md,
/// `connections`). With 126 it probes 1,326 and then 1,452 bytes, and
/// settles on 1,200, 1,326 or 1,452: at worst 126 bytes (9 %) below the
/// path's true MTU, which costs a message server nothing for its small
/// messages and bulk transfers a few percent more packets.
const MTU_MINIMUM_CHANGE: u16 = 126;

/// The path-MTU discovery settings of every fabric connection.
pub fn mtu_discovery() -> quinn::MtuDiscoveryConfig {
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.minimum_change(MTU_MINIMUM_CHANGE);
    mtud
}
