//! `key_slot`: which of the 16384 hash slots a key belongs to, computed exactly as Redis's
//! `keyHashSlot` does (CRC16-XMODEM of the key, or of its `{hash tag}`, modulo 16384). Tests
//! use it to pick keys on a chosen node or slot without asking a server.

use super::CLUSTER_SLOTS;

/// The hash slot of `key`: if the key holds a `{` followed later by a `}` with at least one
/// byte between them, only the bytes between the first `{` and the first `}` after it are
/// hashed (so `{user1000}.following` and `{user1000}.followers` share a slot); otherwise the
/// whole key is.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16_xmodem(hashed) % CLUSTER_SLOTS
}

/// CRC16 with polynomial 0x1021, initial value 0, no reflection (the variant Redis Cluster
/// specifies). Bitwise rather than table-driven: only tests call it.
fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_the_reference_check_value() {
        // The check value of CRC-16/XMODEM, as in the Redis Cluster specification.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
    }

    #[test]
    fn key_slot_matches_redis() {
        let cases: &[(&str, &[u8], u16)] = &[
            ("empty key", b"", 0),
            ("plain key", b"foo", 12182),
            ("plain key 2", b"bar", 5061),
            ("hash tag alone", b"{user1000}", 3443),
            ("hash tag prefix", b"{user1000}.following", 3443),
            (
                "empty tag hashes the whole key",
                b"foo{}{bar}",
                key_slot(b"foo{}{bar}"),
            ),
            (
                "first closing brace ends the tag",
                b"foo{{bar}}zap",
                key_slot(b"{bar"),
            ),
            (
                "only the first tag counts",
                b"foo{bar}{zap}",
                key_slot(b"bar"),
            ),
            (
                "unclosed brace hashes the whole key",
                b"foo{bar",
                crc16_xmodem(b"foo{bar") % 16384,
            ),
        ];
        for (name, key, slot) in cases {
            assert_eq!(key_slot(key), *slot, "{name}");
        }
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{}{bar}"), crc16_xmodem(b"foo{}{bar}") % 16384);
    }
}
