//! XVA: not implemented yet.

use std::sync::Arc;

use crate::chain::{Chain, OpenConfig};
use crate::error::{Error, Result};
use crate::source::Source;

/// Opens every disk of an XVA export as `(<name>.raw, chain)`.
pub fn open_disks(src: Arc<dyn Source>, _cfg: &OpenConfig) -> Result<Vec<(String, Chain)>> {
    Err(Error::unsupported("XVA archives are not supported yet").in_file(src.location()))
}
