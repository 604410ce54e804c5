//! The version of a group's pinned maps.
//!
//! A group outlives the build that created it: `run --takeover` with a
//! newer binary, `ctl` or `join` from another one, all open the maps the
//! creator pinned. Reading records of another shape, or giving a field
//! another meaning, would go wrong silently, so every group records its
//! [`Layout`] in a small map of its own ([`map::LAYOUT`]) before any other
//! pin appears, and every opener checks it first. Groups created before
//! layouts were recorded have no such map: they are recognised as older.

use std::path::Path;

use aya::maps::{Array, Map, MapData};
use reuseport_common::{map, Layout, LAYOUT_MAGIC, LAYOUT_VERSION};

use crate::error::{Error, Result};

/// Writes this build's layout into `layout` (the object's
/// [`map::LAYOUT`] map, before it is pinned).
pub fn write(layout: &mut Map) -> Result<()> {
    let mut array: Array<&mut MapData, Layout> =
        Array::try_from(layout).map_err(|e| Error::bpf(format!("map {}", map::LAYOUT), e))?;
    array
        .set(0, Layout::CURRENT, 0)
        .map_err(|e| Error::bpf("writing the layout record", e))
}

/// What the pins in `dir` hold, against this build's layout: `Ok` when
/// they are of this layout, [`Error::IncompatibleLayout`] when they are
/// of another one or of a build before layouts were recorded. Pins that
/// are not there at all are left to the caller (`Ok`), whose opening of
/// the other maps then says what is missing.
pub fn check(dir: &Path) -> Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    check_group(dir, &name)
}

/// [`check`], for the pins of group `name` reached through `dir` (which
/// may be another path to its directory than one ending in its name).
pub fn check_group(dir: &Path, name: &str) -> Result<()> {
    let name = name.to_string();
    let incompatible = |theirs: String| Error::IncompatibleLayout {
        name: name.clone(),
        theirs,
        ours: LAYOUT_VERSION,
    };
    let path = dir.join(map::LAYOUT);
    if !path.exists() {
        // Every other pin but no layout: a build from before layouts.
        return match dir.join(map::GROUP).exists() {
            true => Err(incompatible(
                "an older layout that records no version".into(),
            )),
            false => Ok(()),
        };
    }
    let data = MapData::from_pin(&path)
        .map_err(|e| Error::bpf(format!("opening {}", path.display()), e))?;
    let map =
        Map::from_map_data(data).map_err(|e| Error::bpf(format!("map {}", map::LAYOUT), e))?;
    // A layout record of another size is not one this build can read.
    let Ok(array) = Array::<MapData, Layout>::try_from(map) else {
        return Err(incompatible("an unknown layout".into()));
    };
    let theirs = array
        .get(&0, 0)
        .map_err(|e| Error::bpf("reading the layout record", e))?;
    if theirs.magic != LAYOUT_MAGIC {
        return Err(incompatible("an unknown layout".into()));
    }
    if theirs.version != LAYOUT_VERSION {
        return Err(incompatible(format!("layout {}", theirs.version)));
    }
    if theirs != Layout::CURRENT {
        // Same number, other records: a build that changed a record and
        // forgot to raise the version.
        return Err(incompatible(format!(
            "layout {} with other record sizes",
            theirs.version
        )));
    }
    Ok(())
}
