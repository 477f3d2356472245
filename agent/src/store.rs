//! The agent's persistent state: every VM's spec and status in a redb database (an embedded,
//! transactional, crash-safe key-value store) in the state directory. Each write is one
//! transaction committed durably before the call that made it returns.

use std::ops::Bound;
use std::path::Path;

use prost::Message;
use quantix_proto::v1::Vm;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use thiserror::Error;

/// VM id -> protobuf-encoded `Vm` (spec and status).
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");

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
}

fn dberr<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(e.into())
}

/// The VM store.
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(dberr)?;
        let tx = db.begin_write().map_err(dberr)?;
        tx.open_table(VMS).map_err(dberr)?;
        tx.commit().map_err(dberr)?;
        Ok(Self { db })
    }

    /// The VM with this id.
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
}
