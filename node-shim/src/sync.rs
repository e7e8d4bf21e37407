//! Moving a map from its current contents to the desired ones as one transition.
//!
//! Entries that are new or changed are written first, stale ones deleted after: a flow always
//! finds either its old entry or its new one, never nothing. An LPM lookup falls back to a
//! shorter prefix only when the longer one is gone, and the shorter one is already in place by
//! then. A transition with nothing to change writes nothing.

use std::collections::BTreeMap;

/// A map the reconciler can write.
pub trait Store<K, V> {
    /// The error of a write.
    type Error;
    /// Inserts or replaces `key`.
    fn upsert(&mut self, key: &K, value: &V) -> Result<(), Self::Error>;
    /// Removes `key` (absent is fine).
    fn remove(&mut self, key: &K) -> Result<(), Self::Error>;
}

/// What a transition did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transition {
    pub upserted: u64,
    pub deleted: u64,
}

impl Transition {
    /// Map writes done.
    pub fn writes(&self) -> u64 {
        self.upserted + self.deleted
    }
}

/// Makes `store` (whose contents `current` mirrors) hold `desired`; `current` follows every write
/// that succeeded, so after an error the next call resumes where this one stopped.
pub fn reconcile<K: Ord + Clone, V: PartialEq + Clone, S: Store<K, V>>(
    store: &mut S,
    current: &mut BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> Result<Transition, S::Error> {
    let mut t = Transition::default();
    for (key, value) in desired {
        if current.get(key) != Some(value) {
            store.upsert(key, value)?;
            current.insert(key.clone(), value.clone());
            t.upserted += 1;
        }
    }
    let stale: Vec<K> = current
        .keys()
        .filter(|k| !desired.contains_key(k))
        .cloned()
        .collect();
    for key in stale {
        store.remove(&key)?;
        current.remove(&key);
        t.deleted += 1;
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory map that records every write.
    #[derive(Default)]
    struct Recorder {
        map: BTreeMap<u32, &'static str>,
        log: Vec<String>,
    }

    impl Store<u32, &'static str> for Recorder {
        type Error = std::convert::Infallible;
        fn upsert(&mut self, key: &u32, value: &&'static str) -> Result<(), Self::Error> {
            self.log.push(format!("upsert {key}"));
            self.map.insert(*key, value);
            Ok(())
        }
        fn remove(&mut self, key: &u32) -> Result<(), Self::Error> {
            self.log.push(format!("remove {key}"));
            self.map.remove(key);
            Ok(())
        }
    }

    #[test]
    fn upserts_come_before_deletes_and_a_resync_writes_nothing() {
        let mut store = Recorder::default();
        let mut current = BTreeMap::new();
        let first = BTreeMap::from([(1, "a"), (2, "b")]);
        assert_eq!(
            reconcile(&mut store, &mut current, &first).unwrap(),
            Transition {
                upserted: 2,
                deleted: 0
            }
        );

        let second = BTreeMap::from([(2, "B"), (3, "c")]);
        store.log.clear();
        let t = reconcile(&mut store, &mut current, &second).unwrap();
        assert_eq!(
            t,
            Transition {
                upserted: 2,
                deleted: 1
            }
        );
        assert_eq!(store.log, ["upsert 2", "upsert 3", "remove 1"]);
        assert_eq!(store.map, second);

        store.log.clear();
        assert_eq!(reconcile(&mut store, &mut current, &second).unwrap().writes(), 0);
        assert!(store.log.is_empty());
    }

    #[test]
    fn a_failed_write_leaves_current_true_to_the_store() {
        struct Failing(u32);
        impl Store<u32, u32> for Failing {
            type Error = ();
            fn upsert(&mut self, key: &u32, _: &u32) -> Result<(), ()> {
                if *key == self.0 { Err(()) } else { Ok(()) }
            }
            fn remove(&mut self, _: &u32) -> Result<(), ()> {
                Ok(())
            }
        }
        let mut current = BTreeMap::new();
        let desired = BTreeMap::from([(1, 1), (2, 2), (3, 3)]);
        assert!(reconcile(&mut Failing(2), &mut current, &desired).is_err());
        assert_eq!(current, BTreeMap::from([(1, 1)]));
        let t = reconcile(&mut Failing(0), &mut current, &desired).unwrap();
        assert_eq!(t.upserted, 2);
    }
}
