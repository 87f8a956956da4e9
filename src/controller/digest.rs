//! SHA-256 digests of JSON values, with object keys in sorted order whatever the map type, so
//! the controller can keep a 32-byte digest of what it compares instead of the objects
//! themselves.

use std::hash::{Hash, Hasher};

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

pub type Digest = [u8; 32];

fn feed(h: &mut Sha256, v: &Value) {
    match v {
        Value::Null => h.update(b"n"),
        Value::Bool(b) => h.update(if *b { b"t" } else { b"f" }),
        Value::Number(n) => {
            h.update(b"#");
            h.update(n.to_string().as_bytes());
            h.update(b";");
        }
        Value::String(s) => {
            h.update(b"s");
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        Value::Array(items) => {
            h.update(b"[");
            h.update((items.len() as u64).to_le_bytes());
            items.iter().for_each(|i| feed(h, i));
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            h.update(b"{");
            h.update((keys.len() as u64).to_le_bytes());
            for k in keys {
                h.update((k.len() as u64).to_le_bytes());
                h.update(k.as_bytes());
                feed(h, &map[k]);
            }
        }
    }
}

/// The digest of a JSON value.
pub fn of_value(v: &Value) -> Digest {
    let mut h = Sha256::new();
    feed(&mut h, v);
    h.finalize().into()
}

/// The digest of anything serializable, through its JSON form.
pub fn of<T: Serialize + ?Sized>(v: &T) -> Digest {
    of_value(&serde_json::to_value(v).expect("serializable to JSON"))
}

/// The digest of a value's compact JSON text, streamed (no intermediate value): for large,
/// deterministic inputs such as the inventory.
pub fn of_stream<T: Serialize + ?Sized>(v: &T) -> Digest {
    struct W(Sha256);
    impl std::io::Write for W {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = W(Sha256::new());
    serde_json::to_writer(&mut w, v).expect("serializable to JSON");
    w.0.finalize().into()
}

/// The digest of a value's `Hash`: for keys the controller compares only within one process
/// (`Hash` output is not stable across builds).
pub fn of_hash<T: Hash + ?Sized>(v: &T) -> Digest {
    struct H(Sha256);
    impl Hasher for H {
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
        fn finish(&self) -> u64 {
            let digest: Digest = self.0.clone().finalize().into();
            u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
        }
    }
    let mut h = H(Sha256::new());
    v.hash(&mut h);
    h.0.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_does_not_matter_but_values_do() {
        assert_eq!(
            of_value(&json!({"a": 1, "b": [1, 2]})),
            of_value(&json!({"b": [1, 2], "a": 1}))
        );
        assert_ne!(
            of_value(&json!({"a": [1, 2]})),
            of_value(&json!({"a": [2, 1]}))
        );
        assert_ne!(of_value(&json!({"a": "1"})), of_value(&json!({"a": 1})));
        assert_ne!(of_value(&json!(["ab", "c"])), of_value(&json!(["a", "bc"])));
    }
}
