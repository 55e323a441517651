//! VHDX through the whole stack (tests arrive with the format).
