use std::net::Ipv4Addr;
use std::time::Duration;

use super::*;

fn registry(ports: Ports) -> (Arc<Cluster>, mpsc::UnboundedReceiver<NodeListener>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let connector = Connector::new("127.0.0.1:1".into(), None, Duration::from_secs(1));
    let cluster = Cluster::new(
        ClusterMode::On,
        Ipv4Addr::LOCALHOST.into(),
        None,
        ports,
        connector,
        NodeOptions {
            tls: true,
            ..NodeOptions::default()
        },
        tx,
    );
    (cluster, rx)
}

/// Two free ports next to each other, for a range test.
fn free_pair() -> u16 {
    for _ in 0..50 {
        let a = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let p = a.local_addr().unwrap().port();
        if p < u16::MAX && std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no two adjacent free ports");
}

#[tokio::test]
async fn a_new_node_gets_a_listener_once() {
    let (cluster, mut rx) = registry(Ports::Any);
    let a = cluster.local("10.0.0.1", 8500).expect("a local address");
    assert_eq!(&*a.host, "127.0.0.1");
    let node = rx.try_recv().expect("a listener for the accept loops");
    assert_eq!(node.listener.local_addr().unwrap().port(), a.port);
    assert_eq!(node.target.connector.addr(), "10.0.0.1:8500");
    let rw = node
        .target
        .rewriter
        .as_ref()
        .expect("node sessions rewrite too");
    assert_eq!(&*rw.origin, "10.0.0.1");
    // Asked again: the same address, no second listener.
    assert_eq!(cluster.local("10.0.0.1", 8500), Some(a.clone()));
    assert!(rx.try_recv().is_err());
    let b = cluster.local("10.0.0.2", 8500).unwrap();
    assert_ne!(a.port, b.port);
    assert_eq!(cluster.len(), 2);
    // Redis writes IPv6 node addresses without brackets.
    cluster.local("fd00::5", 8500).unwrap();
    let v6 = std::iter::from_fn(|| rx.try_recv().ok()).last().unwrap();
    assert_eq!(v6.target.connector.addr(), "[fd00::5]:8500");
}

#[tokio::test]
async fn ports_come_from_the_range_and_run_out() {
    let first = free_pair();
    let (cluster, mut rx) = registry(Ports::Range(first, first + 1));
    let a = cluster.local("10.0.0.1", 8500).unwrap();
    let b = cluster.local("10.0.0.2", 8500).unwrap();
    assert_eq!((a.port, b.port), (first, first + 1));
    assert_eq!(
        cluster.local("10.0.0.3", 8500),
        None,
        "the range is used up"
    );
    // A port freed by a retired node is used again (once its accept loop let it go).
    let one = rx.try_recv().unwrap();
    cluster.update(&[("10.0.0.2".into(), 8500)]);
    assert!(one.stop.is_cancelled());
    drop(one);
    assert_eq!(cluster.len(), 1);
    let c = cluster.local("10.0.0.3", 8500).unwrap();
    assert_eq!(c.port, first);
}

#[tokio::test]
async fn a_vanished_node_is_retired_once_its_clients_have_gone() {
    let (cluster, mut rx) = registry(Ports::Any);
    cluster.update(&[("10.0.0.1".into(), 8500), ("10.0.0.2".into(), 8500)]);
    let one = rx.try_recv().unwrap();
    let two = rx.try_recv().unwrap();
    assert_eq!(cluster.len(), 2);
    one.target.clients.fetch_add(1, Ordering::Relaxed);
    two.target.clients.fetch_add(1, Ordering::Relaxed);
    // Node 1 left the topology while a client uses it: kept for now.
    cluster.update(&[("10.0.0.2".into(), 8500)]);
    assert_eq!(cluster.len(), 2);
    assert!(!one.stop.is_cancelled());
    one.target.clients.fetch_sub(1, Ordering::Relaxed);
    cluster.update(&[("10.0.0.2".into(), 8500)]);
    assert_eq!(cluster.len(), 1);
    assert!(one.stop.is_cancelled(), "its accept loop is told to stop");
    assert!(!two.stop.is_cancelled());
    // A node listed again before it was retired keeps its listener.
    cluster.update(&[]);
    cluster.update(&[("10.0.0.2".into(), 8500)]);
    two.target.clients.fetch_sub(1, Ordering::Relaxed);
    cluster.update(&[("10.0.0.2".into(), 8500)]);
    assert_eq!(cluster.len(), 1);
    assert!(!two.stop.is_cancelled());
}

#[test]
fn port_ranges() {
    assert_eq!(Ports::parse("0"), Ok(Ports::Any));
    assert_eq!(Ports::parse("6380-6479"), Ok(Ports::Range(6380, 6479)));
    assert_eq!(Ports::parse(" 7000 - 7000 "), Ok(Ports::Range(7000, 7000)));
    for bad in ["", "6380", "6479-6380", "0-10", "a-b", "1-70000"] {
        assert!(Ports::parse(bad).is_err(), "{bad:?}");
    }
    assert_eq!(Ports::after(6379), Ports::Range(6380, 6479));
    assert_eq!(Ports::after(0), Ports::Any);
    assert_eq!(Ports::after(65535), Ports::Range(65535, 65535));
    assert_eq!(Ports::Range(1, 2).to_string(), "1-2");
}

#[tokio::test]
async fn the_announced_host_is_what_clients_are_told() {
    let (tx, _rx) = mpsc::unbounded_channel();
    let connector = Connector::new("127.0.0.1:1".into(), None, Duration::from_secs(1));
    let cluster = Cluster::new(
        ClusterMode::On,
        Ipv4Addr::UNSPECIFIED.into(),
        Some("proxy.internal.example"),
        Ports::Any,
        connector,
        NodeOptions {
            tls: true,
            ..NodeOptions::default()
        },
        tx,
    );
    let local = cluster.local("10.0.0.1", 8500).unwrap();
    assert_eq!(&*local.host, "proxy.internal.example");
}

/// A node only a reply named (which a client can forge: a script's `MOVED`) is not to be
/// connected to until a topology read lists it; one a read listed is, and stays so.
#[tokio::test]
async fn only_nodes_a_topology_read_listed_may_be_connected_to() {
    let (cluster, mut rx) = registry(Ports::Any);
    cluster.local("10.0.0.7", 8500).unwrap();
    let named = rx.try_recv().unwrap();
    let listed = named.target.in_topology.clone().expect("a node's gate");
    assert!(!*listed.borrow(), "named by a reply only");
    // Named again by a reply: still not listed.
    cluster.local("10.0.0.7", 8500).unwrap();
    assert!(!*listed.borrow());
    cluster.update(&[("10.0.0.7".into(), 8500), ("10.0.0.8".into(), 8500)]);
    assert!(*listed.borrow(), "a topology read listed it");
    let read = rx.try_recv().unwrap();
    assert!(*read.target.in_topology.as_ref().unwrap().borrow());
}

/// Addresses only redirections named take at most a few listeners until a topology read
/// lists them: a client answering MOVED to addresses of its choice cannot take the range.
#[tokio::test]
async fn nodes_only_redirections_named_take_a_few_listeners_at_most() {
    let (cluster, _rx) = registry(Ports::Any);
    for i in 0..UNLISTED_MAX {
        assert!(cluster.local(&format!("10.0.1.{i}"), 8500).is_some());
    }
    assert_eq!(cluster.local("10.0.1.200", 8500), None);
    // A node a topology read listed is not counted, and frees a place.
    cluster.update(&[("10.0.1.0".into(), 8500)]);
    assert!(cluster.local("10.0.1.201", 8500).is_some());
    assert!(
        cluster.local("10.0.1.0", 8500).is_some(),
        "known nodes are always served"
    );
}
