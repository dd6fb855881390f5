//! A real DNS server (UDP, RFC 1035 messages via `hickory-proto`) on a loopback port, whose
//! A records the test changes at will.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use parking_lot::Mutex;
use tokio::net::UdpSocket;

type Zone = Arc<Mutex<HashMap<String, (Vec<Ipv4Addr>, u32)>>>;

pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Zone,
    queries: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl DnsServer {
    pub async fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let zone: Zone = Default::default();
        let queries = Arc::new(AtomicUsize::new(0));
        let (z, q) = (zone.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(request) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                if request.metadata.message_type != MessageType::Query {
                    continue;
                }
                let mut response = Message::response(request.metadata.id, request.metadata.op_code);
                response.metadata.recursion_desired = request.metadata.recursion_desired;
                response.metadata.recursion_available = true;
                response.metadata.authoritative = true;
                let mut found_name = false;
                for query in &request.queries {
                    response.add_query(query.clone());
                    let name = key(&query.name().to_ascii());
                    let entry = z.lock().get(&name).cloned();
                    if let Some((ips, ttl)) = entry {
                        found_name = true;
                        if query.query_type() == RecordType::A {
                            q.fetch_add(1, Ordering::SeqCst);
                            for ip in ips {
                                response.add_answer(Record::from_rdata(
                                    query.name().clone(),
                                    ttl,
                                    RData::A(A(ip)),
                                ));
                            }
                        }
                    }
                }
                if !found_name {
                    response.metadata.response_code = ResponseCode::NXDomain;
                }
                if let Ok(bytes) = response.to_vec() {
                    let _ = socket.send_to(&bytes, from).await;
                }
            }
        });
        DnsServer {
            addr,
            zone,
            queries,
            task,
        }
    }

    /// Sets the A records of `name`.
    pub fn set(&self, name: &str, ips: &[Ipv4Addr], ttl: u32) {
        self.zone.lock().insert(key(name), (ips.to_vec(), ttl));
    }

    /// A queries answered for known names so far.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
