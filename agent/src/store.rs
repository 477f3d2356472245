//! The agent's persistent state: every VM's spec and status in a redb database (an embedded,
//! transactional, crash-safe key-value store) in the state directory. Each write is one
//! transaction committed durably before the call that made it returns.

use std::ops::Bound;
use std::path::Path;

use prost::Message;
use quantix_proto::v1::{Snapshot, Vm};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use thiserror::Error;

/// VM id -> protobuf-encoded `Vm` (spec and status).
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
/// Records that could not be decoded, moved out of `vms` as they were (for a person to
/// look at); the agent serves the rest.
const QUARANTINE: TableDefinition<&str, &[u8]> = TableDefinition::new("quarantine");
/// Snapshot id -> protobuf-encoded `Snapshot` (what it is of, its parent, its sizes).
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");

/// A store failure.
#[derive(Debug, Error)]
pub enum StoreError {
    /// redb failed.
    #[error("database: {0}")]
    Db(#[from] redb::Error),
    /// A record does not decode.
    #[error("record {id:?} is corrupt: {source}")]
    Corrupt {
        /// The VM id.
        id: String,
        /// The decoder's error.
        #[source]
        source: prost::DecodeError,
    },
    /// A record is kept under another key than its id.
    #[error("record {id:?} names {names:?}")]
    Misnamed {
        /// The key.
        id: String,
        /// The id in the record.
        names: String,
    },
}

fn dberr<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(e.into())
}

/// The VM store.
pub struct Store {
    db: Database,
    /// Tests: every write fails, as on a full disk.
    #[cfg(test)]
    pub fail_writes: std::sync::atomic::AtomicBool,
}

impl Store {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(dberr)?;
        let tx = db.begin_write().map_err(dberr)?;
        tx.open_table(VMS).map_err(dberr)?;
        tx.open_table(QUARANTINE).map_err(dberr)?;
        tx.open_table(SNAPSHOTS).map_err(dberr)?;
        tx.commit().map_err(dberr)?;
        let store = Self {
            db,
            #[cfg(test)]
            fail_writes: Default::default(),
        };
        store.quarantine_bad_records()?;
        store.quarantine_bad_snapshots()?;
        Ok(store)
    }

    /// Moves every record that does not decode (or names another VM than its key) to the
    /// quarantine table; returns their keys.
    fn quarantine_bad_records(&self) -> Result<Vec<String>, StoreError> {
        let bad: Vec<(String, Vec<u8>, String)> = {
            let tx = self.db.begin_read().map_err(dberr)?;
            let table = tx.open_table(VMS).map_err(dberr)?;
            let mut bad = Vec::new();
            for entry in table.iter().map_err(dberr)? {
                let (k, v) = entry.map_err(dberr)?;
                let (key, bytes) = (k.value().to_string(), v.value().to_vec());
                match Vm::decode(bytes.as_slice()) {
                    Ok(vm) if vm.id == key => {}
                    Ok(vm) => bad.push((key, bytes, format!("it names VM {:?}", vm.id))),
                    Err(e) => bad.push((key, bytes, e.to_string())),
                }
            }
            bad
        };
        if bad.is_empty() {
            return Ok(Vec::new());
        }
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut vms = tx.open_table(VMS).map_err(dberr)?;
            let mut q = tx.open_table(QUARANTINE).map_err(dberr)?;
            for (key, bytes, why) in &bad {
                tracing::error!(
                    vm = %key,
                    reason = %why,
                    "a record in the state store cannot be decoded: moved to its quarantine table; the agent serves the other VMs"
                );
                q.insert(key.as_str(), bytes.as_slice()).map_err(dberr)?;
                vms.remove(key.as_str()).map_err(dberr)?;
            }
        }
        tx.commit().map_err(dberr)?;
        Ok(bad.into_iter().map(|b| b.0).collect())
    }

    /// Moves every snapshot record that does not decode (or names another snapshot) to
    /// the quarantine table, under `snapshot:<id>`: one bad record must not stop the agent
    /// or hide the other snapshots.
    fn quarantine_bad_snapshots(&self) -> Result<(), StoreError> {
        let bad: Vec<(String, Vec<u8>, String)> = {
            let tx = self.db.begin_read().map_err(dberr)?;
            let table = tx.open_table(SNAPSHOTS).map_err(dberr)?;
            let mut bad = Vec::new();
            for entry in table.iter().map_err(dberr)? {
                let (k, v) = entry.map_err(dberr)?;
                let (key, bytes) = (k.value().to_string(), v.value().to_vec());
                if let Err(e) = decode_snapshot(&key, &bytes) {
                    bad.push((key, bytes, e.to_string()));
                }
            }
            bad
        };
        if bad.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut snaps = tx.open_table(SNAPSHOTS).map_err(dberr)?;
            let mut q = tx.open_table(QUARANTINE).map_err(dberr)?;
            for (key, bytes, why) in &bad {
                tracing::error!(
                    snapshot = %key,
                    reason = %why,
                    "a snapshot record in the state store cannot be decoded: moved to its quarantine table"
                );
                q.insert(format!("snapshot:{key}").as_str(), bytes.as_slice())
                    .map_err(dberr)?;
                snaps.remove(key.as_str()).map_err(dberr)?;
            }
        }
        tx.commit().map_err(dberr)
    }

    /// Keys of the quarantined records.
    pub fn quarantined(&self) -> Result<Vec<String>, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let table = tx.open_table(QUARANTINE).map_err(dberr)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(dberr)? {
            out.push(entry.map_err(dberr)?.0.value().to_string());
        }
        Ok(out)
    }

    /// Puts raw bytes under `id` (tests: a record as a disk error or a bug could leave it).
    #[cfg(test)]
    fn put_raw(&self, id: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        tx.open_table(VMS)
            .map_err(dberr)?
            .insert(id, bytes)
            .map_err(dberr)?;
        tx.commit().map_err(dberr)
    }

    pub fn get(&self, id: &str) -> Result<Option<Vm>, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let table = tx.open_table(VMS).map_err(dberr)?;
        let Some(value) = table.get(id).map_err(dberr)? else {
            return Ok(None);
        };
        decode(id, value.value()).map(Some)
    }

    /// Writes `vm` (insert or replace), durably.
    pub fn put(&self, vm: &Vm) -> Result<(), StoreError> {
        #[cfg(test)]
        if self.fail_writes.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(StoreError::Db(redb::Error::Io(
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            )));
        }
        let bytes = vm.encode_to_vec();
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut table = tx.open_table(VMS).map_err(dberr)?;
            table
                .insert(vm.id.as_str(), bytes.as_slice())
                .map_err(dberr)?;
        }
        tx.commit().map_err(dberr)
    }

    /// Inserts `vm` unless its id exists; returns the existing record then, atomically.
    pub fn insert_new(&self, vm: &Vm) -> Result<Option<Vm>, StoreError> {
        let bytes = vm.encode_to_vec();
        let tx = self.db.begin_write().map_err(dberr)?;
        let existing = {
            let mut table = tx.open_table(VMS).map_err(dberr)?;
            let existing = match table.get(vm.id.as_str()).map_err(dberr)? {
                Some(v) => Some(decode(&vm.id, v.value())?),
                None => None,
            };
            if existing.is_none() {
                table
                    .insert(vm.id.as_str(), bytes.as_slice())
                    .map_err(dberr)?;
            }
            existing
        };
        if existing.is_some() {
            tx.abort().map_err(dberr)?;
        } else {
            tx.commit().map_err(dberr)?;
        }
        Ok(existing)
    }

    /// Removes the VM; true if it existed.
    pub fn remove(&self, id: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        let existed = {
            let mut table = tx.open_table(VMS).map_err(dberr)?;
            let existed = table.remove(id).map_err(dberr)?.is_some();
            existed
        };
        tx.commit().map_err(dberr)?;
        Ok(existed)
    }

    /// VMs in id order, starting after `after` (all when `None`), that `keep` accepts, at most
    /// `limit` of them; and whether more follow.
    pub fn scan(
        &self,
        after: Option<&str>,
        limit: usize,
        mut keep: impl FnMut(&Vm) -> bool,
    ) -> Result<(Vec<Vm>, bool), StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let table = tx.open_table(VMS).map_err(dberr)?;
        let start = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for entry in table
            .range::<&str>((start, Bound::Unbounded))
            .map_err(dberr)?
        {
            let (key, value) = entry.map_err(dberr)?;
            let vm = decode(key.value(), value.value())?;
            if !keep(&vm) {
                continue;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(vm);
        }
        Ok((out, false))
    }

    /// Every VM.
    pub fn all(&self) -> Result<Vec<Vm>, StoreError> {
        Ok(self.scan(None, usize::MAX, |_| true)?.0)
    }

    /// A snapshot's record.
    pub fn snapshot(&self, id: &str) -> Result<Option<Snapshot>, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let table = tx.open_table(SNAPSHOTS).map_err(dberr)?;
        let Some(value) = table.get(id).map_err(dberr)? else {
            return Ok(None);
        };
        decode_snapshot(id, value.value()).map(Some)
    }

    /// Writes a snapshot's record (insert or replace), durably.
    pub fn put_snapshot(&self, s: &Snapshot) -> Result<(), StoreError> {
        #[cfg(test)]
        if self.fail_writes.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(StoreError::Db(redb::Error::Io(
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            )));
        }
        let bytes = s.encode_to_vec();
        let tx = self.db.begin_write().map_err(dberr)?;
        tx.open_table(SNAPSHOTS)
            .map_err(dberr)?
            .insert(s.id.as_str(), bytes.as_slice())
            .map_err(dberr)?;
        tx.commit().map_err(dberr)
    }

    /// Removes a snapshot's record; true if it existed.
    pub fn remove_snapshot(&self, id: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        let existed = tx
            .open_table(SNAPSHOTS)
            .map_err(dberr)?
            .remove(id)
            .map_err(dberr)?
            .is_some();
        tx.commit().map_err(dberr)?;
        Ok(existed)
    }

    /// Every snapshot, in id order.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let table = tx.open_table(SNAPSHOTS).map_err(dberr)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(dberr)? {
            let (k, v) = entry.map_err(dberr)?;
            out.push(decode_snapshot(k.value(), v.value())?);
        }
        Ok(out)
    }
}

fn decode_snapshot(id: &str, bytes: &[u8]) -> Result<Snapshot, StoreError> {
    match Snapshot::decode(bytes) {
        Ok(s) if s.id == id => Ok(s),
        Ok(s) => Err(StoreError::Misnamed {
            id: id.to_string(),
            names: s.id,
        }),
        Err(source) => Err(StoreError::Corrupt {
            id: id.to_string(),
            source,
        }),
    }
}

fn decode(id: &str, bytes: &[u8]) -> Result<Vm, StoreError> {
    Vm::decode(bytes).map_err(|source| StoreError::Corrupt {
        id: id.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use quantix_proto::v1::VmSpec;

    fn vm(id: &str) -> Vm {
        Vm {
            id: id.into(),
            spec: Some(VmSpec {
                name: format!("n-{id}"),
                vcpus: 1,
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn insert_get_page_remove_and_reopen() {
        let dir = std::env::temp_dir().join(format!("qx-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.redb");
        {
            let store = Store::open(&path).unwrap();
            for id in ["c", "a", "b", "d"] {
                assert!(store.insert_new(&vm(id)).unwrap().is_none());
            }
            let again = store.insert_new(&vm("a")).unwrap();
            assert_eq!(again.unwrap().id, "a");
            let (page, more) = store.scan(None, 2, |_| true).unwrap();
            assert_eq!(
                page.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
                ["a", "b"]
            );
            assert!(more);
            let (page, more) = store.scan(Some("b"), 2, |_| true).unwrap();
            assert_eq!(
                page.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
                ["c", "d"]
            );
            assert!(!more);
            let (page, _) = store.scan(None, 10, |v| v.id != "b").unwrap();
            assert_eq!(page.len(), 3);
            assert!(store.remove("c").unwrap());
            assert!(!store.remove("c").unwrap());
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.all().unwrap().len(), 3);
        assert_eq!(store.get("d").unwrap().unwrap().spec.unwrap().name, "n-d");
        assert!(store.get("c").unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn undecodable_records_are_quarantined_and_the_rest_served() {
        let dir = std::env::temp_dir().join(format!("qx-store-q-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.redb");
        {
            let store = Store::open(&path).unwrap();
            store.insert_new(&vm("good")).unwrap();
            store.put_raw("garbage", &[0xff, 0xff, 0xff, 0x0f]).unwrap();
            store.put_raw("liar", &vm("other").encode_to_vec()).unwrap();
            // Today's agent fails on it: every listing fails.
            assert!(store.all().is_err());
        }
        let store = Store::open(&path).unwrap();
        let all = store.all().unwrap();
        assert_eq!(
            all.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
            ["good"]
        );
        let mut q = store.quarantined().unwrap();
        q.sort();
        assert_eq!(q, ["garbage", "liar"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_snapshot_records_are_quarantined_and_the_rest_served() {
        let dir = std::env::temp_dir().join(format!("qx-store-s-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.redb");
        let snap = |id: &str| Snapshot {
            id: id.into(),
            vm_id: "vm".into(),
            ..Default::default()
        };
        {
            let store = Store::open(&path).unwrap();
            store.put_snapshot(&snap("good")).unwrap();
            let tx = store.db.begin_write().unwrap();
            {
                let mut t = tx.open_table(SNAPSHOTS).unwrap();
                t.insert("garbage", [0xffu8, 0xff, 0xff, 0x0f].as_slice())
                    .unwrap();
                t.insert("liar", snap("other").encode_to_vec().as_slice())
                    .unwrap();
            }
            tx.commit().unwrap();
            assert!(store.snapshots().is_err());
        }
        let store = Store::open(&path).unwrap();
        let ids: Vec<String> = store
            .snapshots()
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, ["good"]);
        let mut q = store.quarantined().unwrap();
        q.sort();
        assert_eq!(q, ["snapshot:garbage", "snapshot:liar"]);
        assert!(store.remove_snapshot("good").unwrap());
        assert!(store.snapshot("good").unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
