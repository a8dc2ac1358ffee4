//! A TCP proxy that injects faults between the idempotency proxy and its store: latency, a
//! black hole (connections open, nothing answers) and resets.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the fault proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward untouched.
    None,
    /// Delay every chunk in both directions.
    Latency(Duration),
    /// Keep connections open but forward nothing.
    Blackhole,
    /// Reset every connection, old and new.
    Reset,
}

/// A fault-injecting TCP proxy on a free loopback port, stopped when dropped.
pub struct FaultProxy {
    /// The proxy's address: point the client here instead of at the target.
    pub addr: SocketAddr,
    fault: watch::Sender<Fault>,
    accept: tokio::task::JoinHandle<()>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl FaultProxy {
    /// Forwards connections to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fault proxy");
        let addr = listener.local_addr().expect("fault proxy address");
        let (fault, watcher) = watch::channel(Fault::None);
        let connections = Arc::new(Mutex::new(Vec::new()));
        let tasks = connections.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let watcher = watcher.clone();
                let task = tokio::spawn(relay(client, target, watcher));
                tasks.lock().expect("tasks").push(task);
            }
        });
        Self {
            addr,
            fault,
            accept,
            connections,
        }
    }

    /// Changes the fault for current and future connections.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for task in self.connections.lock().expect("tasks").drain(..) {
            task.abort();
        }
    }
}

async fn relay(client: TcpStream, target: SocketAddr, mut fault: watch::Receiver<Fault>) {
    if *fault.borrow() == Fault::Reset {
        return reset(client);
    }
    let Ok(server) = TcpStream::connect(target).await else {
        return reset(client);
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let mut upstream_fault = fault.clone();
    let to_server = async {
        pump(&mut client_read, &mut server_write, &mut upstream_fault).await;
    };
    let to_client = async {
        pump(&mut server_read, &mut client_write, &mut fault).await;
    };
    tokio::select! {
        () = to_server => {}
        () = to_client => {}
    }
    if let (Ok(client), Ok(server)) = (
        client_read.reunite(client_write),
        server_read.reunite(server_write),
    ) {
        reset(client);
        reset(server);
    }
}

/// Copies chunks until either side closes or the fault becomes `Reset`.
async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    fault: &mut watch::Receiver<Fault>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            _ = fault.wait_for(|f| *f == Fault::Reset) => return,
        };
        let Ok(read) = read else { return };
        if read == 0 {
            return;
        }
        let current = *fault.borrow();
        match current {
            Fault::None => {}
            Fault::Latency(delay) => tokio::time::sleep(delay).await,
            // Swallow what was read and keep the connection open, answering nothing.
            Fault::Blackhole => continue,
            Fault::Reset => return,
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

fn reset(stream: TcpStream) {
    // A zero linger turns the close into an RST, as a crashed peer or a middlebox would send.
    let _ = stream.set_zero_linger();
    drop(stream);
}
