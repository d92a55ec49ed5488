//! The site catalog: which groups and images exist. Kept in sled behind a narrow trait so the
//! engine does not depend on sled's API and tests can use memory.

use std::collections::BTreeMap;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::types::{GroupOptions, ImageMode};

/// A group's catalog entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Stable id (its directory is `groups/<id as 16 hex digits>`).
    pub id: u64,
    /// Site-unique name.
    pub name: String,
    /// Limits.
    pub options: GroupOptions,
}

/// An image's catalog entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Site-unique name.
    pub name: String,
    /// Group it views.
    pub group: String,
    /// The seq it shows.
    pub seq: u64,
    /// Read-only or writable.
    pub mode: ImageMode,
}

/// What the engine needs from a catalog store.
pub trait Catalog: Send + Sync {
    /// Every group.
    fn groups(&self) -> Result<Vec<GroupRecord>>;
    /// Add or replace a group, durably.
    fn put_group(&self, group: &GroupRecord) -> Result<()>;
    /// Every image.
    fn images(&self) -> Result<Vec<ImageRecord>>;
    /// Add or replace an image, durably.
    fn put_image(&self, image: &ImageRecord) -> Result<()>;
    /// Remove an image, durably.
    fn remove_image(&self, name: &str) -> Result<()>;
}

/// The catalog in a sled database.
pub struct SledCatalog {
    groups: sled::Tree,
    images: sled::Tree,
    db: sled::Db,
}

impl SledCatalog {
    /// Open (or create) the database at `path`.
    pub fn open(path: &std::path::Path) -> Result<SledCatalog> {
        let db =
            sled::open(path).map_err(|e| EngineError::Catalog(format!("open {}: {e}", path.display())))?;
        let tree = |name: &str| {
            db.open_tree(name).map_err(|e| EngineError::Catalog(format!("open tree {name}: {e}")))
        };
        Ok(SledCatalog { groups: tree("groups")?, images: tree("images")?, db })
    }

    fn all<T: serde::de::DeserializeOwned>(tree: &sled::Tree, what: &str) -> Result<Vec<T>> {
        tree.iter()
            .map(|kv| {
                let (k, v) = kv.map_err(|e| EngineError::Catalog(e.to_string()))?;
                postcard::from_bytes(&v).map_err(|e| {
                    EngineError::Catalog(format!(
                        "{what} entry {:?} is undecodable: {e}",
                        String::from_utf8_lossy(&k)
                    ))
                })
            })
            .collect()
    }

    fn put<T: Serialize>(&self, tree: &sled::Tree, key: &str, value: &T) -> Result<()> {
        let bytes = postcard::to_stdvec(value).map_err(|e| EngineError::Catalog(e.to_string()))?;
        tree.insert(key, bytes).map_err(|e| EngineError::Catalog(e.to_string()))?;
        self.db.flush().map_err(|e| EngineError::Catalog(format!("flush: {e}")))?;
        Ok(())
    }
}

impl Catalog for SledCatalog {
    fn groups(&self) -> Result<Vec<GroupRecord>> {
        Self::all(&self.groups, "group")
    }
    fn put_group(&self, group: &GroupRecord) -> Result<()> {
        self.put(&self.groups, &group.name, group)
    }
    fn images(&self) -> Result<Vec<ImageRecord>> {
        Self::all(&self.images, "image")
    }
    fn put_image(&self, image: &ImageRecord) -> Result<()> {
        self.put(&self.images, &image.name, image)
    }
    fn remove_image(&self, name: &str) -> Result<()> {
        self.images.remove(name).map_err(|e| EngineError::Catalog(e.to_string()))?;
        self.db.flush().map_err(|e| EngineError::Catalog(format!("flush: {e}")))?;
        Ok(())
    }
}

/// A catalog in memory, for tests.
#[derive(Default)]
pub struct MemoryCatalog {
    groups: Mutex<BTreeMap<String, GroupRecord>>,
    images: Mutex<BTreeMap<String, ImageRecord>>,
}

impl Catalog for MemoryCatalog {
    fn groups(&self) -> Result<Vec<GroupRecord>> {
        Ok(self.groups.lock().values().cloned().collect())
    }
    fn put_group(&self, group: &GroupRecord) -> Result<()> {
        self.groups.lock().insert(group.name.clone(), group.clone());
        Ok(())
    }
    fn images(&self) -> Result<Vec<ImageRecord>> {
        Ok(self.images.lock().values().cloned().collect())
    }
    fn put_image(&self, image: &ImageRecord) -> Result<()> {
        self.images.lock().insert(image.name.clone(), image.clone());
        Ok(())
    }
    fn remove_image(&self, name: &str) -> Result<()> {
        self.images.lock().remove(name);
        Ok(())
    }
}
