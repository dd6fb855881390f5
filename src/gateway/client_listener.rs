//! The client API's listener: a connection takes its admission place the moment it is
//! accepted, not once its HTTP request has been read, and has [`HTTP_STAGE_TIMEOUT`] to
//! reach the WebSocket upgrade. So a connection that trickles its request (or never sends
//! one) holds a place like any other silent connection, gives it up to a newcomer, and is
//! closed at the deadline; it cannot hold sockets outside the admission's bounds.
//!
//! The place travels with the connection ([`Admitted`]) and the upgrade handler takes it
//! over through the connection's [`ClientConn`] (axum's connect info); from then on the
//! session's own deadlines apply.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::admission::{Admission, Place};

/// Time from accept to the upgrade handler (request read, routed, answered 101).
pub const HTTP_STAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts client API connections, each with its admission place.
pub struct AdmittingListener {
    inner: TcpListener,
    admission: Arc<Admission>,
}

impl AdmittingListener {
    pub fn new(inner: TcpListener, admission: Arc<Admission>) -> Self {
        AdmittingListener { inner, admission }
    }
}

impl Listener for AdmittingListener {
    type Io = Admitted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Admitted, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    let place = self.admission.admit(remote.ip(), None);
                    return (Admitted::new(stream, place), remote);
                }
                // Out of descriptors or a connection reset before accept: the listener is
                // fine, the moment is not.
                Err(e) => {
                    tracing::debug!(error = %e, "client API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// The part of a connection's state its upgrade handler reaches.
pub struct Stage {
    place: Mutex<Option<Place>>,
}

impl Stage {
    /// Takes the connection's place over (once: a second request on the connection gets
    /// `None`). The HTTP-stage deadline no longer applies.
    pub fn take(&self) -> Option<Place> {
        self.place.lock().take()
    }

    fn in_http_stage(&self) -> bool {
        self.place.lock().is_some()
    }
}

/// A client API connection: the socket, and until the upgrade its place and deadline.
pub struct Admitted {
    stream: TcpStream,
    stage: Arc<Stage>,
    evicted: Pin<Box<WaitForCancellationFutureOwned>>,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Admitted {
    fn new(stream: TcpStream, place: Place) -> Self {
        let evicted = Box::pin(place.token().cancelled_owned());
        Admitted {
            stream,
            stage: Arc::new(Stage {
                place: Mutex::new(Some(place)),
            }),
            evicted,
            deadline: Box::pin(tokio::time::sleep(HTTP_STAGE_TIMEOUT)),
        }
    }

    /// An error once the connection lost its place or its time before the upgrade.
    fn check_stage(&mut self, cx: &mut Context<'_>) -> Result<(), io::Error> {
        if !self.stage.in_http_stage() {
            return Ok(());
        }
        if self.evicted.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "admission place taken by a newer connection",
            ));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no WebSocket upgrade in time",
            ));
        }
        Ok(())
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_stage(cx)?;
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_stage(cx)?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// What the upgrade handler learns of its connection.
#[derive(Clone)]
pub struct ClientConn {
    pub remote: SocketAddr,
    pub stage: Arc<Stage>,
}

impl Connected<IncomingStream<'_, AdmittingListener>> for ClientConn {
    fn connect_info(stream: IncomingStream<'_, AdmittingListener>) -> Self {
        ClientConn {
            remote: *stream.remote_addr(),
            stage: stream.io().stage.clone(),
        }
    }
}
