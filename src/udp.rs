//! UDP sockets for QUIC endpoints that carry many connections.

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
