//! Smoke test of the harness: a command through the proxy reaches the TLS server as the
//! token's identity.
mod support;

use support::*;

#[tokio::test]
async fn get_set_through_proxy_as_token_identity() {
    let proxy = Proxy::start().await;
    let mut c = proxy.client().await;
    assert_eq!(
        c.command(&[b"SET", b"k", b"v"]).await.unwrap(),
        Reply::Simple("OK".into())
    );
    assert_eq!(
        c.command(&[b"GET", b"k"]).await.unwrap(),
        Reply::Bulk(Some(b"v".to_vec()))
    );
    let list = proxy.redis.client_list().await.unwrap();
    assert!(
        list.iter()
            .any(|c| c.get("user").map(String::as_str) == Some("oid-1")),
        "{list:?}"
    );
    proxy.stop().await;
}
