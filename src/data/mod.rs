//! Data with an exactly known distribution, for measuring generators.

pub mod glyph;
