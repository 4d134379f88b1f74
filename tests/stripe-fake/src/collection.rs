//! Objects kept in `(created, sequence)` order with an id index: lists are newest first and page by
//! cursor, so a page costs O(log n + limit) even with 100,000 objects, never a scan.

use std::collections::{BTreeMap, HashMap};

/// Position of an object in its list: creation time, then a sequence number that breaks ties within
/// a second in creation order.
pub type Key = (i64, u64);

#[derive(Debug)]
pub struct Collection<T> {
    by_key: BTreeMap<Key, T>,
    keys: HashMap<String, Key>,
    next_seq: u64,
}

impl<T> Default for Collection<T> {
    fn default() -> Self {
        Collection {
            by_key: BTreeMap::new(),
            keys: HashMap::new(),
            next_seq: 0,
        }
    }
}

impl<T> Collection<T> {
    pub fn insert(&mut self, id: String, created: i64, object: T) -> Key {
        self.next_seq += 1;
        let key = (created, self.next_seq);
        self.keys.insert(id, key);
        self.by_key.insert(key, object);
        key
    }

    pub fn key_of(&self, id: &str) -> Option<Key> {
        self.keys.get(id).copied()
    }

    pub fn get(&self, id: &str) -> Option<&T> {
        self.by_key.get(&self.key_of(id)?)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut T> {
        let key = self.key_of(id)?;
        self.by_key.get_mut(&key)
    }

    pub fn get_by_key(&self, key: &Key) -> Option<&T> {
        self.by_key.get(key)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&Key, &T)> {
        self.by_key.iter()
    }

    /// Objects with keys in `low..=high`, oldest first; empty when `low > high`.
    pub fn range(&self, low: Key, high: Key) -> impl DoubleEndedIterator<Item = (&Key, &T)> {
        // BTreeMap::range panics on an inverted range, and the bounds come from client input.
        let bounds = if low <= high { Some(low..=high) } else { None };
        bounds.into_iter().flat_map(|b| self.by_key.range(b))
    }
}

/// The key just before `key` in the total order.
pub fn predecessor((created, seq): Key) -> Option<Key> {
    match seq.checked_sub(1) {
        Some(prev) => Some((created, prev)),
        None => created.checked_sub(1).map(|c| (c, u64::MAX)),
    }
}

/// The key just after `key` in the total order.
pub fn successor((created, seq): Key) -> Option<Key> {
    match seq.checked_add(1) {
        Some(next) => Some((created, next)),
        None => created.checked_add(1).map(|c| (c, 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_at_the_edges() {
        assert_eq!(predecessor((5, 0)), Some((4, u64::MAX)));
        assert_eq!(predecessor((i64::MIN, 0)), None);
        assert_eq!(successor((5, u64::MAX)), Some((6, 0)));
        assert_eq!(successor((i64::MAX, u64::MAX)), None);
    }

    #[test]
    fn inverted_range_is_empty() {
        let mut c = Collection::default();
        c.insert("a".into(), 10, ());
        assert_eq!(c.range((20, 0), (10, 0)).count(), 0);
        assert_eq!(c.range((10, 0), (10, u64::MAX)).count(), 1);
    }
}
