//! What `info` shows of a VMDK layer: where the descriptor is, its facts and disk database, and
//! each extent with its file, how it was found and what its header says.

use super::extent::{ExtentData, SparseExtent, SparseHeader};
use super::hosted::{self, SECTOR};
use super::{DescriptorAt, VmdkLayer};
use crate::error::Result;
use crate::layer::{LayerInfo, ParentInfo};

pub(super) fn describe(layer: &VmdkLayer) -> Result<LayerInfo> {
    let d = &layer.desc;
    let mut details = vec![(
        "descriptor".to_string(),
        match layer.desc_at {
            DescriptorAt::Standalone => "standalone file".to_string(),
            DescriptorAt::Embedded { sector, sectors } => {
                format!("embedded at sector {sector} ({sectors} sectors)")
            }
        },
    )];
    let mut push = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            details.push((k.to_string(), v));
        }
    };
    push("createType", Some(layer.create_type.clone()));
    push("CID", Some(d.cid.map(|c| format!("{c:08x}")).unwrap_or_else(|| "none".into())));
    push("parentCID", d.parent_cid.map(|c| format!("{c:08x}{}", if c == 0xffff_ffff { " (no parent)" } else { "" })));
    push("parentFileNameHint", d.parent_hint.clone());
    push("version", d.version.clone());
    push("encoding", d.encoding.clone());
    for k in ["ddb.adapterType", "ddb.virtualHWVersion", "ddb.thinProvisioned", "ddb.longContentID", "ddb.uuid"] {
        push(k, d.get(k).map(str::to_string));
    }
    for (i, e) in layer.extents.iter().enumerate() {
        let mut v = e.line.display();
        if let Some(p) = &e.path {
            v.push_str(&format!(" -> {p}"));
        }
        if let Some(by) = &e.found {
            v.push_str(&format!(" (found {})", by.describe()));
        }
        v.push_str(&match &e.data {
            ExtentData::Zero => ": zeros".to_string(),
            ExtentData::Flat { offset, .. } => format!(": flat data from byte {offset}"),
            ExtentData::Sparse(s) => format!(": {}", summary(s)),
        });
        details.push((format!("extent {i}"), v));
    }
    let block_size = layer
        .extents
        .iter()
        .find_map(|e| match &e.data {
            ExtentData::Sparse(s) => Some(s.map.grain),
            _ => None,
        })
        .unwrap_or(0);
    let parent = layer.parent.as_ref().map(ParentInfo::from_ref);
    Ok(LayerInfo {
        path: layer.loc.to_string(),
        format: "vmdk",
        subformat: layer.create_type.clone(),
        virtual_size: layer.size,
        block_size,
        identity: d.cid.map(|c| format!("{c:08x}")).unwrap_or_else(|| "none".into()),
        parent,
        allocated_bytes: layer.allocated_bytes()?,
        details,
    })
}

/// A one-line summary of a sparse extent's header.
fn summary(sparse: &SparseExtent) -> String {
    let grain = human_grain(sparse.map.grain);
    match &sparse.header {
        SparseHeader::Hosted { header: h, footer } => {
            let mut out = format!(
                "hosted sparse (KDMV) version {}, flags {:#x}, {grain} grains, {} entries per grain table, grain directory at sector {}",
                h.version,
                h.flags,
                h.gtes_per_gt,
                sparse.map.gd_offset() / SECTOR
            );
            if h.compressed() {
                out.push_str(", deflate-compressed grains");
            }
            if *footer {
                out.push_str(", grain directory found through the footer");
            }
            if h.zero_grain() {
                out.push_str(", zeroed-grain entries");
            }
            if h.flags & hosted::FLAG_RGD != 0 {
                out.push_str(", redundant grain directory");
            }
            if h.unclean_shutdown {
                out.push_str(", unclean shutdown flag set");
            }
            out
        }
        SparseHeader::Cowd(h) => {
            let mut out =
                format!("ESX sparse (COWD) version {}, {grain} grains, generation {}", h.version, h.generation);
            if h.unclean_shutdown {
                out.push_str(", unclean shutdown flag set");
            }
            out
        }
        SparseHeader::SeSparse(h) => format!(
            "SESparse 2.1, {grain} grains, {} entries per grain table, grain directory at sector {} ({} entries), {} grain table slots at sector {}, grains from sector {}",
            h.entries_per_table(),
            h.gd_offset,
            h.gd_entries(),
            h.table_slots(),
            h.gt_offset,
            h.grains_offset
        ),
    }
}

fn human_grain(b: u64) -> String {
    if b >= 1024 { format!("{} KiB", b / 1024) } else { format!("{b} B") }
}
