//! A TCP listener whose connections a handler can kill, so faults can drop a
//! connection without any HTTP answer, as a crashed or partitioned provider
//! would.
//!
//! axum handlers cannot fail, so the handler marks the connection instead:
//! every later read or write on it errors, hyper gives the connection up
//! before a response byte is written, and the socket is closed with
//! `SO_LINGER 0`, which the client sees as a reset.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

pub(crate) struct SimListener(TcpListener);

impl SimListener {
    pub fn new(listener: TcpListener) -> Self {
        Self(listener)
    }
}

impl Listener for SimListener {
    type Io = KillableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((stream, addr)) => {
                    // Small JSON answers: don't let Nagle add latency.
                    let _ = stream.set_nodelay(true);
                    let kill = ConnKill(Arc::new(AtomicBool::new(false)));
                    return (KillableStream { stream, kill }, addr);
                }
                // Typically out of file descriptors under load: back off
                // instead of spinning, like axum's own listener.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// Handle to kill the connection a request arrived on; handlers get it as
/// `ConnectInfo<ConnKill>`.
#[derive(Clone, Debug)]
pub(crate) struct ConnKill(Arc<AtomicBool>);

impl ConnKill {
    pub fn kill(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn is_killed(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl Connected<IncomingStream<'_, SimListener>> for ConnKill {
    fn connect_info(stream: IncomingStream<'_, SimListener>) -> Self {
        stream.io().kill.clone()
    }
}

pub(crate) struct KillableStream {
    stream: TcpStream,
    kill: ConnKill,
}

impl KillableStream {
    fn killed(&self) -> Option<io::Error> {
        if !self.kill.is_killed() {
            return None;
        }
        // Reset rather than FIN: the client must not mistake it for a clean
        // end of a keep-alive connection.
        let _ = self.stream.set_zero_linger();
        Some(io::ErrorKind::ConnectionReset.into())
    }
}

impl AsyncRead for KillableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(err) = this.killed() {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(err) = this.killed() {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(err) = this.killed() {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(err) = this.killed() {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(err) = this.killed() {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}
