//! Following a chain from its top down to its base: the depth limit, cycle detection and the
//! parent identity check. Where parents may be and how they are opened is the business of the
//! [`ParentResolver`] the chain is handed (the open layer, through the gate and the formats), so
//! the chain imports no format.

use std::sync::Arc;

use crate::error::{Error, ErrorKind, Kind, Result};
use crate::gate::{Candidate, FoundBy, Lookup};
use crate::layer::{Identity, Layer, ParentRef};
use crate::source::{FileId, Location};

/// An opened layer and what identifies its file (cycle detection).
#[derive(Debug, Clone)]
pub struct Link {
    pub layer: Arc<dyn Layer>,
    pub id: Option<FileId>,
    /// How a parent was found (`None` for the top, which the user named).
    pub found: Option<FoundBy>,
}

/// Finds and opens parents for [`super::Chain::open`].
pub trait ParentResolver {
    /// Where the parent `pref` of `child` may be, in the order to try.
    fn lookup(&self, child: &dyn Layer, pref: &ParentRef) -> Lookup;
    /// Opens the layer at `at`; `Ok(None)` when nothing exists there.
    fn open(&self, child: &dyn Layer, at: &Candidate) -> Result<Option<Link>>;
}

/// How strictly a chain is followed.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_depth: usize,
    /// Refuse a parent whose identity is not the one its child expects.
    pub check_identity: bool,
}

/// Default bound on the chain length; a loop in crafted images is caught long before.
pub const DEFAULT_MAX_DEPTH: usize = 256;
/// The hard limit on `--max-depth`.
pub const MAX_DEPTH_LIMIT: usize = 4096;

impl Default for Limits {
    fn default() -> Self {
        Limits { max_depth: DEFAULT_MAX_DEPTH, check_identity: true }
    }
}

/// Why a chain cannot be followed.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("chain is deeper than {0} layers (use --max-depth to allow more)")]
    TooDeep(usize),
    #[error("parent cycle: its parent {parent} is {seen}, which is already in the chain")]
    Cycle { parent: Location, seen: Location },
    #[error(
        "parent {parent} has identity {have} but this image expects {want} (wrong or modified parent; --ignore-parent-id overrides)"
    )]
    Mismatch { parent: Location, have: String, want: String },
    #[error(
        "parent not found: the image names {named}; looked for {looked}{refused}; use --parent-dir DIR to say where the parent is"
    )]
    NotFound { named: String, looked: String, refused: String },
    #[error("has no parent: leaving it out (--exclude-top) would leave no disk")]
    NothingBelow,
}

impl ErrorKind for ChainError {
    fn kind(&self) -> Kind {
        match self {
            ChainError::TooDeep(_) | ChainError::Cycle { .. } => Kind::Corrupt,
            ChainError::Mismatch { .. } => Kind::Mismatch,
            ChainError::NotFound { .. } => Kind::NotFound,
            ChainError::NothingBelow => Kind::Usage,
        }
    }
}

fn list<T>(v: &[T], empty: &str, f: impl Fn(&T) -> String) -> String {
    if v.is_empty() { empty.to_string() } else { v.iter().map(f).collect::<Vec<_>>().join(", ") }
}

/// The links from `top` down to the base.
pub(super) fn follow(top: Link, resolver: &dyn ParentResolver, limits: Limits) -> Result<Vec<Link>> {
    let mut links = vec![top];
    loop {
        let child = links.last().map(|l| l.layer.clone()).ok_or_else(|| Error::internal("empty chain"))?;
        let Some(pref) = child.parent() else { break };
        if links.len() >= limits.max_depth {
            return Err(Error::from(ChainError::TooDeep(limits.max_depth)).in_file(links[0].layer.location()));
        }
        let parent = find_parent(child.as_ref(), pref, &links, resolver, limits)?;
        links.push(parent);
    }
    Ok(links)
}

/// Tries each candidate in order; the first that opens and carries an expected identity wins.
fn find_parent(
    child: &dyn Layer,
    pref: &ParentRef,
    chain: &[Link],
    resolver: &dyn ParentResolver,
    limits: Limits,
) -> Result<Link> {
    let here = child.location();
    let lookup = resolver.lookup(child, pref);
    let mut mismatch: Option<Error> = None;
    let mut failure: Option<Error> = None;
    for cand in &lookup.candidates {
        let link = match resolver.open(child, cand) {
            Ok(Some(l)) => l,
            Ok(None) => continue,
            Err(e) => {
                failure.get_or_insert(e);
                continue;
            }
        };
        if let Some(id) = link.id
            && let Some(seen) = chain.iter().find(|l| l.id.is_some_and(|i| i.same_object(&id)))
        {
            let e = ChainError::Cycle { parent: cand.loc.clone(), seen: seen.layer.location().clone() };
            return Err(Error::from(e).in_file(here));
        }
        let ids = link.layer.identity();
        if !limits.check_identity || pref.expect.iter().any(|e| ids.contains(e)) {
            return Ok(link);
        }
        mismatch.get_or_insert_with(|| {
            let e = ChainError::Mismatch {
                parent: cand.loc.clone(),
                have: if ids.is_empty() { "none".into() } else { join(&ids, "/") },
                want: join(&pref.expect, " or "),
            };
            Error::from(e).in_file(here)
        });
    }
    if let Some(e) = mismatch.or(failure) {
        return Err(e);
    }
    let refused = if lookup.refused.is_empty() {
        String::new()
    } else {
        format!(
            "; refused to follow {} (outside the image's directory and --parent-dir; --trust-locators allows it)",
            lookup.refused.join(", ")
        )
    };
    let e = ChainError::NotFound {
        named: list(&pref.hints, "no path", |h| format!("{} '{}'", h.kind, h.path)),
        looked: list(&lookup.candidates, "nothing", |c| c.loc.to_string()),
        refused,
    };
    Err(Error::from(e).in_file(here))
}

fn join(ids: &[Identity], sep: &str) -> String {
    ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(sep)
}
