//! A connected migration stream, plain TCP or inside TLS: what the TLS
//! handshake produces and the connection's I/O thread drives.

use std::net::TcpStream;

/// A connected stream, plain or inside TLS.
pub enum Transport {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP; the handshake is complete.
    Tls(TcpStream, Box<rustls::Connection>),
}

impl Transport {
    pub(crate) fn sock(&self) -> &TcpStream {
        match self {
            Transport::Plain(s) | Transport::Tls(s, _) => s,
        }
    }
}
