//! VHDX: not implemented yet.

use std::sync::Arc;

use crate::chain::OpenConfig;
use crate::error::{Error, Result};
use crate::layer::Layer;
use crate::source::Source;

/// Opens one VHDX layer.
pub fn open(src: Arc<dyn Source>, _cfg: &OpenConfig) -> Result<Arc<dyn Layer>> {
    Err(Error::unsupported("VHDX images are not supported yet").in_file(src.location()))
}
