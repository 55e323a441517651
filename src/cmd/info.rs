//! `vdiskfs info`: the chain top to base, as text or JSON.

use serde_json::json;
use vdiskfs::Result;
use vdiskfs::disk::Disk;
use vdiskfs::layer::Layer;
use vdiskfs::open::open_images;

use super::human;
use super::progress::Bar;
use crate::cli::InfoArgs;

/// The top left out with `--exclude-top`, as `info --json` shows it (null when none).
fn excluded_json(d: &Disk) -> serde_json::Value {
    d.chain().excluded_top().and_then(|x| x.describe().ok()).map_or(serde_json::Value::Null, |i| json!(i))
}

pub fn run(a: &InfoArgs) -> Result<()> {
    let disks = open_images(&a.images()?, &a.open.options()?, &Bar::new(true))?;
    let mut out = Vec::new();
    for d in &disks {
        out.push((d, d.chain().describe()?));
    }
    if a.json {
        let v = json!({
            "image": a.image.display().to_string(),
            "disks": out.iter().map(|(d, layers)| json!({
                "name": d.name(),
                "virtual_size": d.size(),
                "excluded_top": excluded_json(d),
                "layers": layers.iter().enumerate().map(|(i, l)| {
                    let mut v = serde_json::to_value(l).expect("plain data");
                    v["depth"] = json!(i);
                    v["details"] = l.details.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>().into();
                    let remote = remote_json(d.chain().layers()[i].as_ref());
                    if !remote.is_empty() {
                        v["remote"] = json!(remote);
                    }
                    v
                }).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("plain data"));
        return Ok(());
    }
    for (d, layers) in &out {
        println!("disk {}: {} ({} bytes), {} layer(s)", d.name(), human(d.size()), d.size(), layers.len());
        if let Some(x) = d.chain().excluded_top() {
            let id = x.identity().first().map(|i| i.to_string()).unwrap_or_else(|| "none".into());
            println!("  excluded top (--exclude-top; only its parent link was read): {} (identity {id})", x.location());
        }
        for (i, l) in layers.iter().enumerate() {
            let role = if i == 0 {
                " (top)"
            } else if i + 1 == layers.len() {
                " (base)"
            } else {
                ""
            };
            println!("  [{i}]{role} {}", l.path);
            println!("      format:        {} {}", l.format, l.subformat);
            println!("      virtual size:  {} ({} bytes)", human(l.virtual_size), l.virtual_size);
            if l.block_size > 0 {
                println!("      block size:    {}", human(l.block_size));
            }
            println!("      identity:      {}", l.identity);
            println!("      allocated:     {} ({} bytes)", human(l.allocated_bytes), l.allocated_bytes);
            if let Some(p) = &l.parent {
                println!("      parent:        expects {}", p.expected_identity);
                if let Some(r) = &p.resolved {
                    println!("      parent found:  {r}");
                }
                for h in &p.hints {
                    println!("      locator:       {} {}", h.kind, h.path);
                }
            }
            let w = l.details.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0).max(14);
            for (k, v) in &l.details {
                println!("      {:<w$} {v}", format!("{k}:"));
            }
            print_remote(d.chain().layers()[i].as_ref());
        }
    }
    Ok(())
}

/// Where each remote source of a layer lives, how it is read, and what it cost.
fn print_remote(layer: &dyn Layer) {
    for s in layer.sources() {
        if let Some(st) = s.remote_stats() {
            println!("      remote:        {} (read with {})", s.location(), st.transport);
            println!(
                "      transferred:   {} fetched over the network in {} request(s), {} from the cache",
                human(st.fetched),
                st.requests,
                human(st.from_cache)
            );
        }
    }
}

fn remote_json(layer: &dyn Layer) -> Vec<serde_json::Value> {
    let srcs = layer.sources();
    srcs.iter()
        .filter_map(|s| {
            let st = s.remote_stats()?;
            Some(json!({"location": s.location().to_string(), "transport": st.transport,
                "fetched_bytes": st.fetched, "requests": st.requests, "cache_bytes": st.from_cache}))
        })
        .collect()
}
